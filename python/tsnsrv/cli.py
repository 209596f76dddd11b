"""The `tsnsrv` command: run a service, check a configuration, or show status.

    tsnsrv --name NAME [FLAGS] URL        run a service (flags listed by --help)
    tsnsrv --config FILE [FLAGS]          run from a JSON file (what the NixOS module renders)
    tsnsrv check [--config FILE] [FLAGS]  validate and print the effective configuration
    tsnsrv status [NAME...]               show the services running on this machine
    tsnsrv jwks [NAME]                    print a service's identity assertion keys (JWKS)

Command-line flags are generated from the fields of `config.ServiceConfig`, so every
option has exactly one flag and one JSON key.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import typing
from pathlib import Path
from typing import Any, NoReturn

import attrs

from . import __version__, config
from .config import FIELDS, ConfigError, ServiceConfig

EXIT_CONFIG = 2
# `tsnsrv check` takes the service's own flags (build_parser) and only validates them.
CHECK = "check"
# The other subcommands: each module has main(argv) and build_parser(), and is imported
# only when it runs.
SUBCOMMANDS = {"status": "tsnsrv.status", "jwks": "tsnsrv.jwks"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tsnsrv",
        description="Expose a local web service on your tailnet as its own machine.",
        epilog="Subcommands: 'tsnsrv check ...' validates a configuration, 'tsnsrv status' lists running services, "
               "'tsnsrv jwks [NAME]' prints a service's identity assertion keys.",
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("--config", metavar="FILE", help="JSON configuration file; flags given as well override it.")
    parser.add_argument("--version", action="version", version=f"tsnsrv {__version__}")
    for key, field in FIELDS.items():
        if not field.metadata["cli"]:
            continue
        flag = config.cli_flag(field)
        kwargs: dict[str, Any] = {"dest": key, "help": _help(field)}
        if field.metadata["metavar"]:
            kwargs["metavar"] = field.metadata["metavar"]
        if not flag.startswith("-"):
            parser.add_argument(nargs="?", **kwargs)
        elif field.type is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        elif _is_repeatable(field):
            parser.add_argument(flag, action="append", **kwargs)
        else:
            parser.add_argument(flag, **kwargs)
    return parser


def _help(field: attrs.Attribute) -> str:
    text = field.metadata["help"]
    default = field.default
    if isinstance(default, attrs.Factory) or default in (None, attrs.NOTHING, False) or default == 0.0:
        return text
    return f"{text} (default: {default})"


def _is_repeatable(field: attrs.Attribute) -> bool:
    return typing.get_origin(field.type) is list or field.type is config.Headers


def _from_flags(namespace: argparse.Namespace) -> tuple[dict[str, Any], dict[str, str]]:
    """Flag values keyed by JSON key, and how each was spelled."""
    values: dict[str, Any] = {}
    spelling: dict[str, str] = {}
    for key, value in vars(namespace).items():
        if key == "config":
            continue
        field = FIELDS[key]
        if int in typing.get_args(field.type) and isinstance(value, str):
            try:
                value = int(value)
            except ValueError:
                pass  # left as text so the model reports it against the flag
        values[key] = value
        spelling[key] = config.cli_flag(field)
    return values, spelling


def load_from_argv(argv: list[str]) -> ServiceConfig:
    """Parse the command line (and the --config file it names) into a validated config."""
    namespace = build_parser().parse_args(argv)
    values, spelling = _from_flags(namespace)
    config_file = getattr(namespace, "config", None)
    flags = {key: config.cli_flag(field) for key, field in FIELDS.items()}
    if config_file is None:
        return config.load(values, {**flags, **spelling})
    file_values = _read_config_file(Path(config_file))
    unset = {key: f'"{key}" (in {config_file}) or {flag}' for key, flag in flags.items()}
    file_spelling = {key: f'"{key}" in {config_file}' for key in file_values}
    return config.load({**file_values, **values}, {**unset, **file_spelling, **spelling})


def _read_config_file(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise ConfigError([f"--config: cannot read {path}: {exc.strerror}"]) from None
    except json.JSONDecodeError as exc:
        raise ConfigError([f"--config: {path} is not valid JSON: {exc}"]) from None
    if not isinstance(data, dict):
        raise ConfigError([f"--config: {path} must hold a JSON object of options"])
    return data


def print_problems(headline: str, problems: list[str]) -> None:
    print(f"tsnsrv: {headline}:", file=sys.stderr)
    for problem in problems:
        print(f"  - {problem}", file=sys.stderr)


def fail_config(problems: list[str]) -> NoReturn:
    print_problems("invalid configuration", problems)
    sys.exit(EXIT_CONFIG)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] and argv[0] in SUBCOMMANDS:
        sys.exit(importlib.import_module(SUBCOMMANDS[argv[0]]).main(argv[1:]))
    check_only = argv[:1] == [CHECK]
    try:
        cfg = load_from_argv(argv[1:] if check_only else argv)
    except ConfigError as exc:
        fail_config(exc.problems)
    if check_only:
        print(json.dumps(config.unstructure(cfg), indent=2, sort_keys=True))
        return
    from .service import run
    sys.exit(run(cfg))
