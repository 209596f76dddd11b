"""The NixOS option tree and the runtime's config model, checked against each other.

The runtime's options are the JSON keys of `tsnsrv.config.FIELDS`. Every one of them
must be a service option of the module or a key the module sets itself (the unit
layout); every service option must be a runtime key or one of the few options that
only shape the units; and the defaults must agree, so that an unset option means the
same thing in configuration.nix and on the command line.

nixos/options.nix is evaluated here with a stub of nixpkgs' `lib` (tests/nix/stub-lib.nix);
test_module_lib.py repeats the option checks with the real one when it is available.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import attrs
import pytest

from harness.nixtools import NIXOS, TESTS, nix_eval, nix_string
from tsnsrv import config

RUNTIME_KEYS = set(config.FIELDS)
# Declared per service only: they make no sense as a default for every service.
PER_SERVICE = {"name", "toURL"}


@pytest.fixture(scope="module")
def render_lists() -> dict[str, list[str]]:
    return nix_eval(f"let r = import {nix_string(NIXOS / 'render.nix')}; in "
                    "{ inherit (r) optionKeys managedKeys moduleOnlyOptions; }")


@pytest.fixture(scope="module")
def options() -> dict[str, dict[str, Any]]:
    return nix_eval(f"import {nix_string(TESTS / 'options-eval.nix')}")


def runtime_default(key: str) -> Any:
    default = config.FIELDS[key].default
    if isinstance(default, attrs.Factory):  # type: ignore[arg-type]
        return default.factory()
    return default


def normalized(value: Any) -> Any:
    # Nix writes 30 where the runtime holds 30.0 seconds.
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, (int, float)):
        return float(value)
    return value


def test_renderer_keys_are_exactly_the_runtime_keys(render_lists: dict[str, list[str]]) -> None:
    produced = set(render_lists["optionKeys"]) | set(render_lists["managedKeys"])
    assert not set(render_lists["optionKeys"]) & set(render_lists["managedKeys"])
    assert not produced - RUNTIME_KEYS, f"render.nix produces keys the runtime does not know: {sorted(produced - RUNTIME_KEYS)}"
    assert not RUNTIME_KEYS - produced, f"runtime options the module cannot set: {sorted(RUNTIME_KEYS - produced)}"


def test_service_options_are_runtime_options(options: dict, render_lists: dict[str, list[str]]) -> None:
    declared = set(options["services"])
    module_only = set(render_lists["moduleOnlyOptions"])
    unknown = declared - module_only - RUNTIME_KEYS
    assert not unknown, f"module options unknown to the runtime (and not module-only): {sorted(unknown)}"
    # The Go module's bug: an option declared but never handed to the process.
    dropped = declared - module_only - set(render_lists["optionKeys"])
    assert not dropped, f"module options render.nix never passes to the runtime: {sorted(dropped)}"
    missing = set(render_lists["optionKeys"]) - declared
    assert not missing, f"runtime options without a module option: {sorted(missing)}"
    assert module_only <= declared, f"module-only options not declared: {sorted(module_only - declared)}"
    managed_but_declared = set(render_lists["managedKeys"]) & declared
    assert not managed_but_declared, f"options the module must set itself: {sorted(managed_but_declared)}"


def test_defaults_are_the_same_options_minus_per_service_ones(options: dict) -> None:
    assert set(options["services"]) - set(options["defaults"]) == PER_SERVICE
    assert set(options["defaults"]) <= set(options["services"])


def test_services_inherit_every_default(options: dict) -> None:
    not_inherited = {name: option["default"] for name, option in options["services"].items()
                     if name not in PER_SERVICE and option["default"] != f"inherited from defaults.{name}"}
    assert not not_inherited, f"service options that ignore services.tsnsrv.defaults: {not_inherited}"
    for name, option in options["services"].items():
        if name not in PER_SERVICE:
            assert option["defaultText"] == f"config.services.tsnsrv.defaults.{name}", name


def test_module_defaults_equal_runtime_defaults(options: dict, render_lists: dict[str, list[str]]) -> None:
    mismatched = {}
    for key in render_lists["optionKeys"]:
        if key in PER_SERVICE:
            continue
        ours = options["defaults"][key]["default"]
        theirs = runtime_default(key)
        if normalized(ours) != normalized(theirs if not isinstance(theirs, Path) else str(theirs)):
            mismatched[key] = (ours, theirs)
    assert not mismatched, f"module default != runtime default (module, runtime): {mismatched}"


def test_every_option_is_documented(options: dict) -> None:
    undocumented = [name for name, option in options["services"].items() if len(option["description"]) < 20]
    assert not undocumented


def test_fixtures_together_produce_every_runtime_key(render_lists: dict[str, list[str]]) -> None:
    rendered = nix_eval(f"import {nix_string(TESTS / 'render-fixtures.nix')} {{ }}")
    produced = set().union(*(set(c) for c in rendered.values()))
    assert not produced - RUNTIME_KEYS, sorted(produced - RUNTIME_KEYS)
    # Keys the module never sets: both units run as one user, and the daemon's unit is
    # confined by systemd, so the spawn-mode guard's escape hatch has no meaning there.
    never = RUNTIME_KEYS - produced
    assert never == {"tailscaledUser", "allowUnconfinedTailscaled"}, \
        f"runtime options no fixture reaches: {sorted(never)}"


def test_option_types_follow_the_runtime_types(options: dict) -> None:
    """Booleans are booleans, lists are lists, durations take numbers and Go strings."""
    services = options["services"]
    for key, field in config.FIELDS.items():
        if key not in services:
            continue
        described = services[key]["type"]
        if field.type is bool:
            assert described == "boolean", (key, described)
        elif field.type is config.Duration:
            assert "nonnegative" in described and "pattern" in described, (key, described)
        elif str(field.type).startswith("list["):
            assert described.startswith("list of"), (key, described)
        if "None" in str(field.type) and key not in PER_SERVICE:
            assert described.startswith("null or"), (key, described)


def test_go_duration_pattern_matches_the_runtime(options: dict) -> None:
    """The duration strings the module's type admits are those the runtime parses."""
    described = options["services"]["timeout"]["type"]
    pattern = described.split("string matching the pattern ", 1)[1]
    samples = ["0", "30s", "1m30s", "500ms", "1.5h", "10", "s", "1d", "-5s", "1m 30s", "2h45m0.5s"]
    matched = nix_eval("{ pattern, samples }: map (s: builtins.match pattern s != null) (builtins.fromJSON samples)",
                       args={"pattern": pattern, "samples": json.dumps(samples)})
    for sample, matches in zip(samples, matched):
        try:
            config.parse_duration(sample)
            parses = sample != "10"  # a bare number is written as a Nix number, not a string
        except ValueError:
            parses = False
        assert matches == parses, f"{sample!r}: the module's type says {matches}, the runtime says {parses}"
