"""The one configuration model of a tsnsrv service.

Every option exists exactly once, as a field of `ServiceConfig`. Its metadata says
how it is spelled in the JSON config file (what the NixOS module renders) and on
the command line, so both entry points are structured by the same cattrs
converter into the same attrs class and cannot drift apart. `load` collects every
problem it finds and reports each with the spelling the user wrote.
"""

from __future__ import annotations

import ipaddress
import re
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, NewType
from urllib.parse import urlsplit

import attrs
import cattrs
from cattrs.errors import (
    AttributeValidationNote,
    ClassValidationError,
    ForbiddenExtraKeysError,
    IterableValidationError,
    IterableValidationNote,
)
from cattrs.cols import list_structure_factory
from cattrs.gen import make_dict_structure_fn, override

Duration = NewType("Duration", float)
"""Seconds. Written as a number of seconds or a Go duration string ("1m30s", "500ms")."""

Headers = NewType("Headers", dict)
"""Header name to value. Written as an object or as a list of "Name: value" strings."""

IDENTITY_SCHEMAS = ("tsnsrv", "serve")
LOG_LEVELS = ("debug", "info", "warning", "error")
FUNNEL_PORTS = (443, 8443, 10000)
PREFIX_QUALIFIERS = ("tailnet:", "funnel:")


def option(default: Any = attrs.NOTHING, *, help: str, flag: str | None = None, json: str | None = None,
           metavar: str | None = None, cli: bool = True, factory: Any = None) -> Any:
    """An attrs field carrying how the option is written in JSON and on the command line.

    `flag` defaults to the field name in kebab-case and `json` to camelCase.
    """
    metadata = {"help": help, "flag": flag, "json": json, "metavar": metavar, "cli": cli}
    if factory is not None:
        return attrs.field(factory=factory, metadata=metadata)
    return attrs.field(default=default, metadata=metadata)


def json_key(field: attrs.Attribute) -> str:
    if field.metadata.get("json"):
        return field.metadata["json"]
    head, *rest = field.name.split("_")
    return head + "".join(part.capitalize() for part in rest)


def cli_flag(field: attrs.Attribute) -> str:
    return field.metadata.get("flag") or "--" + field.name.replace("_", "-")


def option_name(key: str) -> str:
    """An option in both spellings, for messages that cannot know which one the user wrote."""
    return f"{cli_flag(FIELDS[key])} ({key})"


@attrs.frozen
class AccessRule:
    """Allow or deny requests under a path prefix to identities matching any selector.

    A rule without selectors matches every request under its prefix. On the command
    line a rule is one string: ``ACTION [PREFIX] [SELECTOR...]`` where a selector is
    ``user:LOGIN``, ``domain:DOMAIN``, ``node:NAME``, ``tag:NAME`` or ``cap:CAPABILITY``.
    """

    action: Literal["allow", "deny"]
    prefix: str = "/"
    users: list[str] = attrs.field(factory=list)
    domains: list[str] = attrs.field(factory=list)
    nodes: list[str] = attrs.field(factory=list)
    tags: list[str] = attrs.field(factory=list)
    capabilities: list[str] = attrs.field(factory=list)

    SELECTORS = {"user": "users", "domain": "domains", "node": "nodes", "cap": "capabilities"}

    @classmethod
    def parse(cls, text: str) -> AccessRule:
        words = text.split()
        if not words or words[0] not in ("allow", "deny"):
            raise ValueError(f'"{text}" must start with "allow" or "deny"')
        fields: dict[str, Any] = {"action": words[0]}
        for word in words[1:]:
            if word.startswith("/") or word.startswith(PREFIX_QUALIFIERS):
                if "prefix" in fields:
                    raise ValueError(f'"{text}" names more than one path prefix')
                fields["prefix"] = word
                continue
            kind, sep, value = word.partition(":")
            if not sep or not value:
                raise ValueError(f'"{word}" in "{text}" is not a selector; use user:, domain:, node:, tag: or cap:')
            if kind == "tag":
                fields.setdefault("tags", []).append(word)
            elif kind in cls.SELECTORS:
                fields.setdefault(cls.SELECTORS[kind], []).append(value)
            else:
                raise ValueError(f'"{word}" in "{text}" is not a selector; use user:, domain:, node:, tag: or cap:')
        return cls(**fields)

    @property
    def selects_identity(self) -> bool:
        """Whether the rule applies only to some clients (and so needs to know who they are)."""
        return bool(self.users or self.domains or self.nodes or self.tags or self.capabilities)

    def describe(self) -> str:
        selectors = [f"user:{u}" for u in self.users] + [f"domain:{d}" for d in self.domains]
        selectors += [f"node:{n}" for n in self.nodes] + list(self.tags)
        selectors += [f"cap:{c}" for c in self.capabilities]
        return " ".join([self.action, self.prefix, *selectors])


@attrs.frozen
class ServiceConfig:
    # The service and its node on the tailnet.
    name: str = option(help="Name of the service: its machine name on the tailnet (a DNS label).")
    to_url: str = option(json="toURL", flag="URL", metavar="URL",
                         help="Upstream URL to proxy to (http:// or https://, may carry a base path).")
    login_server_url: str | None = option(None, flag="--login-server", metavar="URL",
                                          help="Control server URL (e.g. a headscale instance). Default: Tailscale's.")
    auth_key_path: Path | None = option(None, flag="--auth-key-file", metavar="FILE",
                                        help="File holding an auth key or OAuth client secret (tskey-client-...). "
                                             "Default: the key in $TS_AUTHKEY or $TS_AUTH_KEY, then the file "
                                             "$CREDENTIALS_DIRECTORY/authKey.")
    tags: list[str] = option(factory=list, flag="--tag", metavar="TAG",
                             help="ACL tag (tag:NAME), repeatable: put on keys minted from an OAuth secret (which "
                                  "requires tags) and requested at interactive login. An auth key brings its own.")
    ephemeral: bool = option(False, help="Register an ephemeral node, removed when it goes offline or stops.")
    state_dir: Path | None = option(None, metavar="DIR",
                                    help="Directory for this service's node state and certificates. Default: "
                                         "$STATE_DIRECTORY/NAME, else /var/lib/tsnsrv/NAME as root, else "
                                         "$XDG_STATE_HOME/tsnsrv/NAME (~/.local/state/...).")
    timeout: Duration = option(0.0, metavar="DURATION",
                               help="Give up if the node is not up within this time; 0 waits forever.")
    tailscaled_socket: Path | None = option(None, metavar="SOCKET",
                                            help="Attach to a running tailscaled by its LocalAPI socket instead of "
                                                 "spawning one (what the NixOS module does).")
    tailscaled_path: str = option("tailscaled", flag="--tailscaled", metavar="PATH",
                                  help="tailscaled binary to spawn.")
    tailscaled_user: str | None = option(None, metavar="USER",
                                         help="Account to run the spawned tailscaled as; required when tsnsrv "
                                              "runs as root.")
    tailscaled_verbose: bool = option(False, help="Log tailscaled's own output at info level instead of debug.")
    tailscaled_log_upload: bool = option(False, help="Let the spawned tailscaled upload its logs to Tailscale.")
    allow_unconfined_tailscaled: bool = option(
        False, help="Start the spawned tailscaled even where the loopback guard cannot work (no seccomp user "
                    "notification), leaving host loopback reachable by tailnet peers. Default: refuse to start.")

    # How the service listens on the tailnet.
    listen_port: int | None = option(None, metavar="PORT",
                                     help="Tailnet port to serve on. Default: 443, or 80 with --plaintext.")
    plaintext: bool = option(False, help="Serve plain HTTP instead of HTTPS.")
    certificate_file: Path | None = option(None, flag="--cert-file", metavar="FILE",
                                           help="TLS certificate (PEM chain) to serve instead of the node's "
                                                "*.ts.net certificate.")
    certificate_key: Path | None = option(None, flag="--key-file", metavar="FILE",
                                          help="Private key for --cert-file.")
    funnel: bool = option(False, help="Also expose the service to the public internet with Tailscale Funnel.")
    funnel_only: bool = option(False, help="Serve only Funnel (public) traffic, refuse tailnet clients.")
    read_header_timeout: Duration = option(30.0, metavar="DURATION",
                                           help="Time a tailnet client has to send request headers (slowloris "
                                                "guard); 0 disables.")
    funnel_read_header_timeout: Duration = option(5.0, metavar="DURATION",
                                                  help="Time a Funnel client has to send request headers.")
    front_address: str = option("127.0.0.2", metavar="ADDR",
                                help="Loopback address of the internal listener tailscaled forwards to. Must not "
                                     "be 127.0.0.1, where tailscaled forwards unclaimed ports.")

    # Which requests are allowed and what the upstream learns about them.
    prefixes: list[str] = option(factory=list, flag="--prefix", metavar="PREFIX",
                                 help="Allowed path prefix, repeatable; 'tailnet:' or 'funnel:' restricts it to "
                                      "one kind of client. Default: everything.")
    deny_prefixes: list[str] = option(factory=list, flag="--deny-prefix", metavar="PREFIX",
                                      help="Path prefix to refuse with 404, repeatable; wins over --prefix.")
    strip_prefix: bool = option(True, help="Remove the matched --prefix from the path sent upstream.")
    access_rules: list[AccessRule] = option(factory=list, flag="--access", metavar="RULE",
                                            help="Access rule 'allow|deny [PREFIX] [user:|domain:|node:|tag:|cap:"
                                                 "...]', repeatable, evaluated in order.")
    suppress_whois: bool = option(False, help="Do not look up or send client identity headers.")
    whois_timeout: Duration = option(1.0, metavar="DURATION", help="Longest wait for a client identity lookup.")
    identity_headers: list[str] = option(factory=lambda: ["tsnsrv"], flag="--identity-header", metavar="SCHEMA",
                                         help="Identity header schema to send: 'tsnsrv' (X-Tailscale-*) and/or "
                                              "'serve' (Tailscale-User-*), repeatable.")
    app_capabilities: list[str] = option(factory=list, flag="--app-capability", metavar="CAP",
                                         help="Peer capability forwarded in Tailscale-App-Capabilities "
                                              "('serve' schema), repeatable.")
    recommended_proxy_headers: bool = option(True, help="Send Host, X-Scheme, X-Real-Ip and "
                                                        "X-Forwarded-{Server,Port} like nginx setups expect.")
    upstream_headers: Headers = option(factory=dict, flag="--upstream-header", metavar="'NAME: VALUE'",
                                              help="Extra header on every upstream request, repeatable.")

    # Signed identity assertions (assertion.py, docs/identity-assertions.md).
    assertions: bool = option(False, help="Also send each tailnet client's identity as a signed assertion (a JWS, "
                                          "EdDSA) in X-Tailscale-Identity-Assertion, which the upstream can verify "
                                          "with the service's public keys (JWKS).")
    assertion_audience: str | None = option(None, metavar="AUDIENCE",
                                            help="Audience (aud) of the assertions. Default: the service name.")
    assertion_lifetime: Duration = option(60.0, metavar="DURATION",
                                          help="How long an assertion is valid (exp - iat); at least 1s.")
    assertion_bind_request: bool = option(False, help="Bind each assertion to its request's method and target (htm "
                                                      "and htu claims), signing every request instead of reusing "
                                                      "one assertion per client until shortly before it expires.")
    assertion_key_rotation: Duration = option(604800.0, metavar="DURATION",
                                              help="How long each signing key signs (at least the assertion "
                                                   "lifetime). Its successor is in the JWKS that long before, and "
                                                   "it stays there until its last assertion expired.")
    assertion_key_dir: Path | None = option(None, metavar="DIR",
                                            help="Directory of the private signing keys, private to this process's "
                                                 "account. Default: STATE_DIR/assertion-keys.")
    assertion_jwks_file: Path | None = option(None, metavar="FILE",
                                              help="Write the public keys (JWKS) to this file (mode 0644) for the "
                                                   "upstream; its directory must exist. They are also served on the "
                                                   "control socket at /jwks.json.")

    # The upstream.
    upstream_unix_addr: Path | None = option(None, flag="--upstream-unix", metavar="SOCKET",
                                             help="Connect to the upstream over this unix socket.")
    upstream_tcp_addr: str | None = option(None, json="upstreamTCPAddr", metavar="HOST:PORT",
                                           help="Connect to this TCP address instead of the URL's host.")
    insecure_https: bool = option(False, json="insecureHTTPS", flag="--insecure-https",
                                  help="Do not verify the upstream's TLS certificate.")
    upstream_ca_file: Path | None = option(None, metavar="FILE",
                                           help="CA bundle to verify the upstream's TLS certificate with.")
    upstream_allow_insecure_ciphers: bool = option(False, help="Allow upstream TLS cipher suites without "
                                                               "forward secrecy (old appliances).")
    upstream_connect_timeout: Duration = option(10.0, metavar="DURATION", help="Upstream connect timeout.")
    upstream_retry_window: Duration = option(10.0, metavar="DURATION",
                                             help="While the upstream refuses connections (it is restarting), keep "
                                                  "trying this long before answering 502; the request waits with "
                                                  "its body unread. 0 answers 502 at once.")
    upstream_response_header_timeout: Duration = option(300.0, metavar="DURATION",
                                                        help="Time the upstream has to start its response after "
                                                             "the request was sent; 0 disables.")
    upstream_idle_timeout: Duration = option(0.0, metavar="DURATION",
                                             help="Abort a proxied exchange when no bytes flow either way for this "
                                                  "long; 0 (default) never, so long polls and streams live on.")

    # Operations.
    metrics_addr: str | None = option(None, metavar="[HOST]:PORT|tailnet:PORT",
                                      help="Also serve Prometheus metrics on this TCP address, or on this port of "
                                           "the service's tailnet node. Always on the control socket.")
    control_socket: Path | None = option(None, metavar="PATH",
                                         help="Unix socket serving /health and /metrics. Default: "
                                              "$RUNTIME_DIRECTORY/control.sock or a per-user runtime directory.")
    log_level: str = option("info", metavar="LEVEL", help="One of debug, info, warning, error.")
    access_log: bool = option(True, help="Log one line per request.")
    shutdown_timeout: Duration = option(20.0, metavar="DURATION",
                                        help="On SIGTERM, how long in-flight requests may take to finish.")

    @property
    def effective_listen_port(self) -> int:
        if self.listen_port is not None:
            return self.listen_port
        return 80 if self.plaintext else 443

    @property
    def spawns_tailscaled(self) -> bool:
        return self.tailscaled_socket is None


attrs.resolve_types(AccessRule)
attrs.resolve_types(ServiceConfig)
FIELDS: dict[str, attrs.Attribute] = {json_key(f): f for f in attrs.fields(ServiceConfig)}
REQUIRED = [key for key, f in FIELDS.items() if f.default is attrs.NOTHING]


class ConfigError(Exception):
    """Every problem found in a configuration, each naming the option as the user wrote it."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


# --- structuring -----------------------------------------------------------------

_GO_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


_SECONDS = re.compile(r"\d+(\.\d+)?")


def parse_duration(value: Any) -> float:
    """A non-negative number of seconds, or a Go duration string like "1m30s"."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError("expected a duration such as 30, \"30s\", \"1m30s\" or \"500ms\"")
    if isinstance(value, str):
        text = value.strip()
        if text == "":
            return 0.0
        if _SECONDS.fullmatch(text):  # a bare number of seconds, as on the command line
            return float(text)
        pos, total = 0, 0.0
        for match in _GO_DURATION.finditer(text):
            if match.start() != pos:
                break
            total += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
            pos = match.end()
        if pos != len(text) or pos == 0:
            raise ValueError(f'"{value}" is not a duration; use e.g. "30s", "1m30s" or "500ms"')
        return total
    if value < 0:
        raise ValueError(f"{value} is negative; durations are 0 or more seconds")
    return float(value)


def _strict(expected: type, description: str):
    def structure(value: Any, _type: Any) -> Any:
        # bool is an int in Python; a JSON true must not pass as a port number.
        if isinstance(value, expected) and not (expected is int and isinstance(value, bool)):
            return value
        raise ValueError(f"expected {description}, got {json_repr(value)}")
    return structure


def json_repr(value: Any) -> str:
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    return repr(value)


def _structure_path(value: Any, _type: Any) -> Path:
    if not isinstance(value, str) or not value:
        raise ValueError(f"expected a file path, got {json_repr(value)}")
    return Path(value)


def _structure_rule(value: Any, _type: Any) -> AccessRule:
    if isinstance(value, str):
        return AccessRule.parse(value)
    if isinstance(value, Mapping):
        return _rule_converter.structure(value, AccessRule)
    raise ValueError(f"expected a rule string or object, got {json_repr(value)}")


def _structure_headers(value: Any, _type: Any) -> Headers:
    """Headers as an object {"Name": "value"} or a list of "Name: value" strings."""
    if isinstance(value, Mapping):
        items = list(value.items())
    elif isinstance(value, list):
        items = []
        for entry in value:
            name, sep, header_value = entry.partition(":") if isinstance(entry, str) else ("", "", "")
            if not sep:
                raise ValueError(f'{json_repr(entry)} is not a header; write "Name: value"')
            items.append((name.strip(), header_value.strip()))
    else:
        raise ValueError(f"expected headers as an object or \"Name: value\" strings, got {json_repr(value)}")
    headers = {}
    for name, header_value in items:
        if not isinstance(header_value, str) or not _TOKEN.fullmatch(str(name)):
            raise ValueError(f"{json_repr(name)}: {json_repr(header_value)} is not a valid header")
        headers[name] = header_value
    return Headers(headers)


_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def _make_converter(forbid_extra_keys: bool) -> cattrs.Converter:
    conv = cattrs.Converter(forbid_extra_keys=forbid_extra_keys, detailed_validation=True)
    conv.register_structure_hook(str, _strict(str, "a string"))
    conv.register_structure_hook(bool, _strict(bool, "true or false"))
    conv.register_structure_hook(int, _strict(int, "an integer"))
    conv.register_structure_hook(Path, _structure_path)
    conv.register_structure_hook(Duration, lambda v, _t: parse_duration(v))
    conv.register_structure_hook_factory(lambda t: typing.get_origin(t) is list, _strict_list(conv))
    return conv


def _strict_list(conv: cattrs.Converter):
    """Only a JSON array is a list: cattrs would otherwise turn "abc" into ["a", "b", "c"]."""
    def factory(list_type: Any) -> Any:
        structure_items = list_structure_factory(list_type, conv)

        def structure(value: Any, _type: Any) -> list:
            if not isinstance(value, list):
                raise ValueError(f"expected a list, got {json_repr(value)}")
            return structure_items(value, list_type)
        return structure
    return factory


_rule_converter = _make_converter(forbid_extra_keys=True)
_converter = _make_converter(forbid_extra_keys=True)
_converter.register_structure_hook(AccessRule, _structure_rule)
_converter.register_structure_hook(Headers, _structure_headers)
_converter.register_structure_hook(
    ServiceConfig,
    make_dict_structure_fn(ServiceConfig, _converter,
                           **{f.name: override(rename=json_key(f)) for f in attrs.fields(ServiceConfig)}),
)


def unstructure(config: ServiceConfig) -> dict[str, Any]:
    """The JSON form of a config (what `load` accepts back)."""
    out = {}
    for key, field in FIELDS.items():
        value = getattr(config, field.name)
        if isinstance(value, Path):
            value = str(value)
        elif isinstance(value, list) and value and isinstance(value[0], AccessRule):
            value = [attrs.asdict(rule) for rule in value]
        out[key] = value
    return out


def load(data: Any, spelling: Mapping[str, str] | None = None) -> ServiceConfig:
    """Structure and validate `data` (JSON keys) or raise ConfigError listing every problem.

    `spelling` maps a JSON key to how the user wrote it (e.g. "--listen-port"), so a
    message names the flag for command-line input and the key for file input.
    """
    spelling = dict(spelling or {})

    def named(key: str) -> str:
        return spelling.get(key, f'"{key}"')

    if not isinstance(data, Mapping):
        raise ConfigError([f"the configuration must be a JSON object, got {json_repr(data)}"])
    problems = [f"{named(key)} is required: {FIELDS[key].metadata['help']}" for key in REQUIRED if key not in data]
    broken = set(REQUIRED) - set(data)
    try:
        config = _converter.structure({**_PLACEHOLDERS, **data}, ServiceConfig)
    except ClassValidationError as exc:
        structure_problems, broken_keys = _describe_structure_errors(exc, named)
        problems += structure_problems
        broken |= broken_keys
        # Check the rest too, so that one run reports every problem.
        sound = {key: value for key, value in data.items() if key in FIELDS and key not in broken}
        try:
            config = _converter.structure({**_PLACEHOLDERS, **sound}, ServiceConfig)
        except ClassValidationError:
            raise ConfigError(problems) from None
    problems += [f"{named(key)}: {message}" for key, message in semantic_problems(config) if key not in broken]
    if problems:
        raise ConfigError(problems)
    return config


# Stand-ins for missing or broken required options while the rest is checked.
_PLACEHOLDERS = {"name": "placeholder", "toURL": "http://placeholder"}
_KEY_OF_ATTRIBUTE = {field.name: key for key, field in FIELDS.items()}


def _describe_structure_errors(exc: ClassValidationError, named) -> tuple[list[str], set[str]]:
    problems, broken = [], set()
    for error in exc.exceptions:
        if isinstance(error, ForbiddenExtraKeysError):
            for key in sorted(error.extra_fields):
                import difflib  # only to suggest a spelling

                close = difflib.get_close_matches(key, FIELDS, n=1)
                hint = f'; did you mean "{close[0]}"?' if close else ""
                problems.append(f'unknown option "{key}"{hint}')
            continue
        notes = getattr(error, "__notes__", [])
        attribute = next((note.name for note in notes if isinstance(note, AttributeValidationNote)), None)
        key = _KEY_OF_ATTRIBUTE.get(attribute)
        broken.add(key)
        where = named(key) if key else "configuration"
        for message in _leaf_messages(error):
            problems.append(f"{where}: {message}")
    return problems, broken


def _leaf_messages(error: BaseException) -> list[str]:
    if isinstance(error, (ClassValidationError, IterableValidationError)):
        messages = []
        for inner in error.exceptions:
            notes = getattr(inner, "__notes__", [])
            label = next((f"entry {note.index}" for note in notes if isinstance(note, IterableValidationNote)),
                         next((f"field {note.name!r}" for note in notes if isinstance(note, AttributeValidationNote)),
                              None))
            for message in _leaf_messages(inner):
                messages.append(f"{label}: {message}" if label else message)
        return messages
    if isinstance(error, ForbiddenExtraKeysError):
        return [f"unknown field(s) {', '.join(sorted(error.extra_fields))}"]
    if isinstance(error, KeyError):
        return [f"missing field {error.args[0]!r}"]
    text = str(error)
    if isinstance(error, (TypeError, AttributeError)) or not text:
        return ["has the wrong type"]
    return [text]


# --- semantic checks -------------------------------------------------------------

_DNS_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
_TAG = re.compile(r"tag:[A-Za-z0-9][A-Za-z0-9-]*")
_AUDIENCE = re.compile(r"[^\x00-\x1f\x7f]+")


def semantic_problems(c: ServiceConfig) -> list[tuple[str, str]]:
    """Cross-field and value checks that the type alone cannot express."""
    problems: list[tuple[str, str]] = []

    def bad(key: str, message: str) -> None:
        problems.append((key, message))

    if not _DNS_LABEL.fullmatch(c.name):
        bad("name", f'"{c.name}" is not a machine name; use 1-63 lowercase letters, digits and "-"')
    url = urlsplit(c.to_url)
    if url.scheme not in ("http", "https") or not url.hostname:
        bad("toURL", f'"{c.to_url}" is not an http:// or https:// URL with a host')
    for tag in c.tags:
        if not _TAG.fullmatch(tag):
            bad("tags", f'"{tag}" is not a tag; tags look like "tag:server"')
    if c.login_server_url is not None:
        login = urlsplit(c.login_server_url)
        if login.scheme not in ("http", "https") or not login.hostname:
            bad("loginServerUrl", f'"{c.login_server_url}" is not an http:// or https:// URL')
    if c.listen_port is not None and not 1 <= c.listen_port <= 65535:
        bad("listenPort", f"{c.listen_port} is not a TCP port (1-65535)")
    if c.plaintext and c.funnel:
        bad("plaintext", "Funnel only carries TLS; drop plaintext or funnel")
    if c.plaintext and c.certificate_file:
        bad("plaintext", "a certificate file makes no sense with plaintext; drop one of them")
    if (c.certificate_file is None) != (c.certificate_key is None):
        bad("certificateFile" if c.certificate_file is None else "certificateKey",
            "certificateFile and certificateKey must be given together")
    if c.funnel_only and not c.funnel:
        bad("funnelOnly", "funnelOnly needs funnel enabled too")
    if c.funnel and c.effective_listen_port not in FUNNEL_PORTS:
        bad("listenPort", f"Funnel only accepts ports {', '.join(map(str, FUNNEL_PORTS))}, "
                          f"not {c.effective_listen_port}")
    try:
        front = ipaddress.ip_address(c.front_address)
        if not front.is_loopback:
            bad("frontAddress", f"{front} is not a loopback address; use one like 127.0.0.2")
        elif front in (ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")):
            bad("frontAddress", f"{front} is where tailscaled forwards unclaimed tailnet ports, so peers could "
                                "reach the listener directly; use another loopback address like 127.0.0.2")
    except ValueError:
        bad("frontAddress", f'"{c.front_address}" is not an IP address; use a loopback address like 127.0.0.2')
    for key, values in (("prefixes", c.prefixes), ("denyPrefixes", c.deny_prefixes)):
        for prefix in values:
            if not _strip_qualifier(prefix).startswith("/"):
                bad(key, f'"{prefix}" must start with "/", "tailnet:/" or "funnel:/"')
    for index, rule in enumerate(c.access_rules):
        if rule.action not in ("allow", "deny"):
            bad("accessRules", f'entry {index}: action "{rule.action}" must be "allow" or "deny"')
        if not _strip_qualifier(rule.prefix).startswith("/"):
            bad("accessRules", f'entry {index}: prefix "{rule.prefix}" must start with "/", "tailnet:/" or "funnel:/"')
        for tag in rule.tags:
            if not _TAG.fullmatch(tag):
                bad("accessRules", f'entry {index}: "{tag}" is not a tag; tags look like "tag:family"')
        if c.suppress_whois and rule.selects_identity:
            bad("accessRules", f'entry {index}: "{rule.describe()}" selects clients by identity, which suppressWhois '
                               "turns off; drop suppressWhois or the rule's selectors")
    for schema in c.identity_headers:
        if schema not in IDENTITY_SCHEMAS:
            bad("identityHeaders", f'"{schema}" is not a header schema; use "tsnsrv" or "serve"')
    if c.app_capabilities and "serve" not in c.identity_headers:
        bad("appCapabilities", 'capabilities are sent in the "serve" header schema; add it to identityHeaders')
    if c.assertions and c.suppress_whois:
        bad("assertions", "assertions carry the client's identity, which suppressWhois turns off; drop one of them")
    if c.assertion_audience is not None and not _AUDIENCE.fullmatch(c.assertion_audience):
        bad("assertionAudience", f"{json_repr(c.assertion_audience)} is not an audience; use a non-empty string "
                                 "without control characters, e.g. the upstream's name")
    if c.assertion_lifetime < 1:
        bad("assertionLifetime", f"{c.assertion_lifetime:g}s is too short; assertions are valid for whole seconds, "
                                 "use at least 1s")
    if c.assertion_key_rotation < c.assertion_lifetime:
        bad("assertionKeyRotation", f"{c.assertion_key_rotation:g}s is shorter than assertionLifetime "
                                    f"({c.assertion_lifetime:g}s); a key must sign at least as long as an "
                                    "assertion lives")
    if c.upstream_unix_addr is not None and c.upstream_tcp_addr is not None:
        bad("upstreamUnixAddr", "connect either over a unix socket or to a TCP address, not both")
    if c.upstream_tcp_addr is not None and not _is_host_port(c.upstream_tcp_addr):
        bad("upstreamTCPAddr", f'"{c.upstream_tcp_addr}" is not HOST:PORT')
    if c.metrics_addr is not None and not _is_metrics_addr(c.metrics_addr):
        bad("metricsAddr", f'"{c.metrics_addr}" is not HOST:PORT, :PORT or tailnet:PORT')
    if c.log_level not in LOG_LEVELS:
        bad("logLevel", f'"{c.log_level}" is not a log level; use one of {", ".join(LOG_LEVELS)}')
    return problems


def _strip_qualifier(prefix: str) -> str:
    for qualifier in PREFIX_QUALIFIERS:
        if prefix.startswith(qualifier):
            return prefix[len(qualifier):]
    return prefix


def _is_host_port(text: str) -> bool:
    host, sep, port = text.rpartition(":")
    return bool(sep) and port.isdigit() and 0 < int(port) < 65536 and bool(host)


def _is_metrics_addr(text: str) -> bool:
    if text.startswith("tailnet:"):
        port = text.removeprefix("tailnet:")
        return port.isdigit() and 0 < int(port) < 65536
    host, sep, port = text.rpartition(":")
    return bool(sep) and port.isdigit() and 0 < int(port) < 65536
