"""The one config model: JSON data and command-line flags structured into ServiceConfig.

What is proved here: a minimal config loads with the documented defaults; every bad
input is reported once, naming the option as the user wrote it (JSON key for a file,
flag for the command line) and what would be valid; several problems come out in one
run; flags override the --config file; durations and headers accept their documented
forms; and the real `tsnsrv` console script exits 2 without touching the disk.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tsnsrv import cli, config
from tsnsrv.config import AccessRule, ConfigError, load, parse_duration

MINIMAL = {"name": "books", "toURL": "http://127.0.0.1:8083"}
TSNSRV = Path(sys.executable).parent / "tsnsrv"


def problems_of(data, spelling=None) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load(data, spelling)
    return caught.value.problems


def cli_problems(argv: list[str]) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        cli.load_from_argv(argv)
    return caught.value.problems


# --- a valid configuration ---------------------------------------------------------


def test_minimal_config_loads_with_documented_defaults():
    cfg = load(MINIMAL)
    assert cfg.name == "books"
    assert cfg.to_url == "http://127.0.0.1:8083"
    assert cfg.plaintext is False
    assert cfg.effective_listen_port == 443
    assert cfg.front_address == "127.0.0.2"
    assert cfg.identity_headers == ["tsnsrv"]
    assert cfg.strip_prefix is True
    assert cfg.read_header_timeout == 30.0
    assert cfg.upstream_response_header_timeout == 300.0
    assert cfg.spawns_tailscaled is True
    assert cfg.upstream_headers == {}


def test_plaintext_defaults_to_port_80_and_explicit_port_wins():
    assert load({**MINIMAL, "plaintext": True}).effective_listen_port == 80
    assert load({**MINIMAL, "plaintext": True, "listenPort": 8080}).effective_listen_port == 8080


def test_funnel_on_an_allowed_port_is_valid():
    cfg = load({**MINIMAL, "funnel": True, "listenPort": 8443})
    assert cfg.funnel and cfg.effective_listen_port == 8443


def test_unstructure_round_trips_through_load():
    data = {**MINIMAL, "tags": ["tag:web"], "stateDir": "/var/lib/x", "accessRules": ["allow /api user:a@b.c"],
            "upstreamHeaders": ["X-A: 1"], "timeout": "1m"}
    cfg = load(data)
    again = load(json.loads(json.dumps(config.unstructure(cfg))))
    assert again == cfg


# --- one problem per bad input, in the JSON spelling ---------------------------------


@pytest.mark.parametrize(("extra", "key", "valid_hint"), [
    ({"name": "Books"}, '"name"', "lowercase letters, digits"),
    ({"name": "-books"}, '"name"', "lowercase letters, digits"),
    ({"name": "a" * 64}, '"name"', "1-63"),
    ({"toURL": "ftp://nas"}, '"toURL"', "http:// or https://"),
    ({"toURL": "http://"}, '"toURL"', "with a host"),
    ({"listenPort": "443"}, '"listenPort"', "expected an integer"),
    ({"listenPort": True}, '"listenPort"', "expected an integer"),
    ({"listenPort": 70000}, '"listenPort"', "1-65535"),
    ({"plaintext": "yes"}, '"plaintext"', "true or false"),
    ({"tags": "tag:a"}, '"tags"', "expected a list"),
    ({"tags": ["server"]}, '"tags"', '"tag:server"'),
    ({"frontAddress": "127.0.0.1"}, '"frontAddress"', "127.0.0.2"),
    ({"frontAddress": "10.0.0.1"}, '"frontAddress"', "not a loopback address"),
    ({"frontAddress": "localhost"}, '"frontAddress"', "not an IP address"),
    ({"logLevel": "loud"}, '"logLevel"', "debug, info, warning, error"),
    ({"prefixes": ["api"]}, '"prefixes"', 'must start with "/"'),
    ({"denyPrefixes": ["tailnet:admin"]}, '"denyPrefixes"', '"tailnet:/"'),
    ({"identityHeaders": ["nginx"]}, '"identityHeaders"', '"tsnsrv" or "serve"'),
    ({"appCapabilities": ["example.com/cap/x"]}, '"appCapabilities"', '"serve"'),
    ({"metricsAddr": "tailnet:99999"}, '"metricsAddr"', "tailnet:PORT"),
    ({"upstreamTCPAddr": "nohost"}, '"upstreamTCPAddr"', "HOST:PORT"),
    ({"loginServerUrl": "headscale.example"}, '"loginServerUrl"', "http:// or https://"),
    ({"timeout": "soon"}, '"timeout"', '"1m30s"'),
    ({"timeout": -1}, '"timeout"', "0 or more seconds"),
    ({"stateDir": ""}, '"stateDir"', "file path"),
    ({"accessRules": ["permit /x"]}, '"accessRules"', '"allow" or "deny"'),
    ({"accessRules": ["allow /x bob"]}, '"accessRules"', "user:, domain:, node:, tag: or cap:"),
    ({"accessRules": ["allow /x tag:bad_tag"]}, '"accessRules"', '"tag:family"'),
    ({"upstreamHeaders": ["no colon"]}, '"upstreamHeaders"', '"Name: value"'),
    ({"upstreamHeaders": {"Bad Name": "x"}}, '"upstreamHeaders"', "not a valid header"),
    ({"funnelOnly": True}, '"funnelOnly"', "funnel enabled"),
    ({"plaintext": True, "funnel": True, "listenPort": 443}, '"plaintext"', "Funnel only carries TLS"),
    ({"certificateFile": "/c.pem"}, '"certificateKey"', "given together"),
    ({"upstreamUnixAddr": "/s", "upstreamTCPAddr": "h:1"}, '"upstreamUnixAddr"', "not both"),
    ({"assertions": True, "suppressWhois": True}, '"assertions"', "suppressWhois"),
    ({"assertionAudience": ""}, '"assertionAudience"', "non-empty string"),
    ({"assertionAudience": "books\n"}, '"assertionAudience"', "without control characters"),
    ({"assertionLifetime": 0.5}, '"assertionLifetime"', "at least 1s"),
    ({"assertionLifetime": "2m", "assertionKeyRotation": "1m"}, '"assertionKeyRotation"',
     "shorter than assertionLifetime (120s)"),
])
def test_each_bad_json_value_is_one_problem_naming_its_key(extra, key, valid_hint):
    problems = problems_of({**MINIMAL, **extra})
    assert len(problems) == 1, problems
    assert problems[0].startswith(key + ":") or problems[0].startswith(key + " "), problems
    assert valid_hint in problems[0]


def test_missing_required_options_are_named_with_their_meaning():
    problems = problems_of({})
    assert problems == [
        '"name" is required: ' + config.FIELDS["name"].metadata["help"],
        '"toURL" is required: ' + config.FIELDS["toURL"].metadata["help"],
    ]


def test_not_an_object_is_refused():
    assert problems_of([]) == ["the configuration must be a JSON object, got []"]
    assert problems_of("books") == ['the configuration must be a JSON object, got "books"']


def test_several_problems_are_all_reported_at_once():
    problems = problems_of({"name": "Books", "toURL": "ftp://nas", "listenPort": 8080, "funnel": True,
                            "logLevel": "loud", "tags": "x", "timeout": "1x"})
    joined = "\n".join(problems)
    assert len(problems) == 6, problems
    for key in ('"name"', '"toURL"', '"listenPort"', '"logLevel"', '"tags"', '"timeout"'):
        assert key in joined


def test_a_broken_value_does_not_also_produce_follow_up_problems():
    # A wrongly typed listenPort must not additionally trip the Funnel port check.
    problems = problems_of({**MINIMAL, "funnel": True, "listenPort": "8443"})
    assert problems == ['"listenPort": expected an integer, got "8443"']


def test_missing_required_plus_other_problems():
    problems = problems_of({"toURL": 5, "logLevel": "x"})
    assert problems[0].startswith('"name" is required')
    assert '"toURL": expected a string, got 5' in problems
    assert any(p.startswith('"logLevel"') for p in problems)
    assert len(problems) == 3


def test_access_rule_object_with_bad_action_names_the_entry():
    problems = problems_of({**MINIMAL, "accessRules": [{"action": "allow"}, {"action": "maybe"}]})
    assert len(problems) == 1
    assert problems[0].startswith('"accessRules": entry 1:')
    assert "allow" in problems[0] and "deny" in problems[0]


def test_access_rule_objects_reject_unknown_fields():
    problems = problems_of({**MINIMAL, "accessRules": [{"action": "allow", "user": ["a"]}]})
    assert len(problems) == 1
    assert "entry 0" in problems[0] and "user" in problems[0]


# --- unknown keys ------------------------------------------------------------------


def test_unknown_key_is_refused_with_a_suggestion():
    assert problems_of({**MINIMAL, "listnPort": 443}) == ['unknown option "listnPort"; did you mean "listenPort"?']


def test_flag_spelling_as_json_key_gets_the_json_key_suggested():
    assert problems_of({**MINIMAL, "toUrl": "http://x"}) == ['unknown option "toUrl"; did you mean "toURL"?']


def test_unknown_key_without_a_close_match_has_no_suggestion():
    assert problems_of({**MINIMAL, "zzzqqq": 1}) == ['unknown option "zzzqqq"']


def test_unknown_keys_do_not_hide_other_problems():
    problems = problems_of({**MINIMAL, "bogus": 1, "logLevel": "loud"})
    assert len(problems) == 2
    assert problems[0] == 'unknown option "bogus"'
    assert problems[1].startswith('"logLevel"')


# --- durations ---------------------------------------------------------------------


@pytest.mark.parametrize(("written", "seconds"), [
    (30, 30.0), (1.5, 1.5), (0, 0.0), ("0", 0.0), ("30s", 30.0), ("1m30s", 90.0), ("500ms", 0.5),
    ("1h", 3600.0), ("1.5h", 5400.0), (".5s", 0.5), ("2us", 2e-6), ("2µs", 2e-6), ("10ns", 1e-8),
    ("1h2m3s4ms", 3723.004),
])
def test_durations_in_seconds_or_go_syntax(written, seconds):
    assert parse_duration(written) == pytest.approx(seconds)
    assert load({**MINIMAL, "whoisTimeout": written}).whois_timeout == pytest.approx(seconds)


@pytest.mark.parametrize("written", ["1x", "1m 30s", "+5s", "-5s", "1M", "s", "1e3s", "30 s"])
def test_bad_duration_strings_are_refused(written):
    with pytest.raises(ValueError, match="is not a duration"):
        parse_duration(written)


@pytest.mark.parametrize("written", [True, None, [1], {"s": 1}])
def test_non_duration_types_are_refused(written):
    with pytest.raises(ValueError, match="expected a duration"):
        parse_duration(written)


def test_negative_number_is_refused():
    with pytest.raises(ValueError, match="negative"):
        parse_duration(-0.5)


# --- headers -----------------------------------------------------------------------


def test_headers_as_object():
    cfg = load({**MINIMAL, "upstreamHeaders": {"X-Env": "prod", "X-Empty": ""}})
    assert cfg.upstream_headers == {"X-Env": "prod", "X-Empty": ""}


def test_headers_as_name_value_list_split_at_first_colon_and_trimmed():
    cfg = load({**MINIMAL, "upstreamHeaders": ["X-Env:  prod ", "X-Url: http://a:1/"]})
    assert cfg.upstream_headers == {"X-Env": "prod", "X-Url": "http://a:1/"}


@pytest.mark.parametrize("value", ["X-A: b", 5, [5], {"X-A": 1}])
def test_headers_of_wrong_shape_are_refused(value):
    problems = problems_of({**MINIMAL, "upstreamHeaders": value})
    assert len(problems) == 1 and problems[0].startswith('"upstreamHeaders":')


# --- the command line --------------------------------------------------------------


def test_cli_minimal():
    cfg = cli.load_from_argv(["--name", "books", "http://127.0.0.1:8083"])
    assert cfg == load(MINIMAL)


def test_cli_problems_name_the_flags():
    problems = cli_problems(["--name", "Books", "--listen-port", "8080", "--funnel", "ftp://nas"])
    assert problems == [
        '--name: "Books" is not a machine name; use 1-63 lowercase letters, digits and "-"',
        'URL: "ftp://nas" is not an http:// or https:// URL with a host',
        "--listen-port: Funnel only accepts ports 443, 8443, 10000, not 8080",
    ]


def test_cli_missing_required_names_flag_and_positional():
    problems = cli_problems([])
    assert problems[0].startswith("--name is required")
    assert problems[1].startswith("URL is required")


@pytest.mark.parametrize(("argv", "start"), [
    (["--listen-port", "abc"], '--listen-port: expected an integer, got "abc"'),
    (["--timeout", "soon"], '--timeout: "soon" is not a duration'),
    (["--tag", "web"], '--tag: "web" is not a tag'),
    (["--access", "permit /"], '--access: entry 0: "permit /" must start with "allow" or "deny"'),
    (["--upstream-header", "nocolon"], '--upstream-header: "nocolon" is not a header'),
    (["--front-address", "127.0.0.1"], "--front-address: 127.0.0.1 is where tailscaled forwards"),
    (["--identity-header", "nginx"], '--identity-header: "nginx" is not a header schema'),
    (["--cert-file", "/c.pem"], "--key-file: certificateFile and certificateKey must be given together"),
])
def test_cli_bad_values_name_their_flag(argv, start):
    problems = cli_problems(["--name", "books", *argv, "http://x"])
    assert len(problems) == 1, problems
    assert problems[0].startswith(start), problems


def test_cli_repeatable_flags_and_booleans():
    cfg = cli.load_from_argv([
        "--name", "books", "--tag", "tag:a", "--tag", "tag:b", "--prefix", "/api", "--deny-prefix", "/api/admin",
        "--access", "allow /api user:alice@example.com", "--access", "deny /", "--upstream-header", "X-A: 1",
        "--upstream-header", "X-B: 2", "--no-strip-prefix", "--plaintext", "--timeout", "1m30s",
        "--identity-header", "tsnsrv", "--identity-header", "serve", "http://127.0.0.1:1"])
    assert cfg.tags == ["tag:a", "tag:b"]
    assert cfg.prefixes == ["/api"] and cfg.deny_prefixes == ["/api/admin"]
    assert cfg.access_rules == [AccessRule("allow", "/api", users=["alice@example.com"]), AccessRule("deny", "/")]
    assert cfg.upstream_headers == {"X-A": "1", "X-B": "2"}
    assert cfg.strip_prefix is False and cfg.plaintext is True
    assert cfg.timeout == 90.0
    assert cfg.identity_headers == ["tsnsrv", "serve"]


def test_flags_override_config_file_values(tmp_path):
    path = tmp_path / "books.json"
    path.write_text(json.dumps({**MINIMAL, "listenPort": 8443, "logLevel": "debug", "tags": ["tag:file"]}))
    cfg = cli.load_from_argv(["--config", str(path), "--listen-port", "9000", "--tag", "tag:flag"])
    assert cfg.listen_port == 9000
    assert cfg.tags == ["tag:flag"]
    assert cfg.log_level == "debug"  # not overridden: from the file
    assert cfg.name == "books"


def test_config_file_problems_name_key_and_file_and_flag_problems_name_flag(tmp_path):
    path = tmp_path / "books.json"
    path.write_text(json.dumps({**MINIMAL, "logLevel": "loud"}))
    problems = cli_problems(["--config", str(path), "--name", "Bad"])
    assert f'"logLevel" in {path}: "loud" is not a log level; use one of debug, info, warning, error' in problems
    assert any(p.startswith('--name: "Bad"') for p in problems)
    assert len(problems) == 2


def test_required_option_missing_from_both_file_and_flags(tmp_path):
    path = tmp_path / "books.json"
    path.write_text(json.dumps({"name": "books"}))
    problems = cli_problems(["--config", str(path)])
    assert problems == [f'"toURL" (in {path}) or URL is required: ' + config.FIELDS["toURL"].metadata["help"]]


def test_unknown_key_in_config_file(tmp_path):
    path = tmp_path / "books.json"
    path.write_text(json.dumps({**MINIMAL, "lisenPort": 1}))
    assert cli_problems(["--config", str(path)]) == ['unknown option "lisenPort"; did you mean "listenPort"?']


@pytest.mark.parametrize(("content", "message"), [
    ("{not json", "is not valid JSON"),
    ("[1, 2]", "must hold a JSON object of options"),
])
def test_unreadable_config_files(tmp_path, content, message):
    path = tmp_path / "books.json"
    path.write_text(content)
    problems = cli_problems(["--config", str(path)])
    assert len(problems) == 1 and problems[0].startswith("--config: ") and message in problems[0]


def test_missing_config_file(tmp_path):
    problems = cli_problems(["--config", str(tmp_path / "nope.json")])
    assert problems == [f"--config: cannot read {tmp_path / 'nope.json'}: No such file or directory"]


def test_every_option_has_a_flag_and_help():
    parser = cli.build_parser()
    flags = {option for action in parser._actions for option in action.option_strings}
    for key, field in config.FIELDS.items():
        assert field.metadata["help"]
        flag = config.cli_flag(field)
        if flag.startswith("--"):
            assert flag in flags, key
            if field.type is bool:
                assert "--no-" + flag[2:] in flags, key


def test_cli_duration_as_bare_seconds():
    cfg = cli.load_from_argv(["--name", "books", "--read-header-timeout", "30", "http://x"])
    assert cfg.read_header_timeout == 30.0


def test_identity_rules_without_whois_are_refused():
    problems = problems_of({**MINIMAL, "suppressWhois": True, "accessRules": ["deny /admin user:bob@example.com"]})
    assert len(problems) == 1 and "suppressWhois" in problems[0]


def test_check_prints_effective_config(capsys):
    cli.main(["check", "--name", "books", "--listen-port", "8443", "http://127.0.0.1:8083"])
    printed = json.loads(capsys.readouterr().out)
    assert printed["name"] == "books" and printed["listenPort"] == 8443 and printed["toURL"] == "http://127.0.0.1:8083"
    assert set(printed) == set(config.FIELDS)


def test_check_exits_2_listing_problems(capsys):
    with pytest.raises(SystemExit) as caught:
        cli.main(["check", "--name", "Books", "http://x"])
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("tsnsrv: invalid configuration:\n  - --name: ")


# --- the real console script -----------------------------------------------------


def run_tsnsrv(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HOME": str(tmp_path / "home"), "XDG_STATE_HOME": str(tmp_path / "xdg-state"),
           "XDG_RUNTIME_DIR": str(tmp_path / "xdg-run"), "STATE_DIRECTORY": "", "RUNTIME_DIRECTORY": ""}
    for var in ("TS_AUTHKEY", "TS_AUTH_KEY", "NOTIFY_SOCKET", "CREDENTIALS_DIRECTORY"):
        env.pop(var, None)
    return subprocess.run([str(TSNSRV), *args], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=30)


def test_console_script_refuses_bad_config_with_exit_2_and_creates_nothing(tmp_path):
    state = tmp_path / "explicit-state"
    result = run_tsnsrv(["--name", "Books", "--state-dir", str(state), "--listen-port", "8080", "--funnel",
                         "ftp://nas"], tmp_path)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        "tsnsrv: invalid configuration:",
        '  - --name: "Books" is not a machine name; use 1-63 lowercase letters, digits and "-"',
        '  - URL: "ftp://nas" is not an http:// or https:// URL with a host',
        "  - --listen-port: Funnel only accepts ports 443, 8443, 10000, not 8080",
    ]
    assert not state.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_console_script_refuses_bad_config_file_before_creating_the_default_state_dir(tmp_path):
    path = tmp_path / "svc.json"
    path.write_text(json.dumps({"name": "unit-test-svc-nowhere", "toURL": "http://x", "logLevel": "loud",
                                "listnPort": 1}))
    result = run_tsnsrv(["--config", str(path)], tmp_path)
    assert result.returncode == 2
    assert 'unknown option "listnPort"; did you mean "listenPort"?' in result.stderr
    assert f'"logLevel" in {path}: "loud" is not a log level' in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["svc.json"]
    assert not Path("/var/lib/tsnsrv/unit-test-svc-nowhere").exists()


def test_console_script_check_prints_json_and_exits_0(tmp_path):
    result = run_tsnsrv(["check", "--name", "books", "--plaintext", "http://127.0.0.1:8083"], tmp_path)
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    assert printed["plaintext"] is True and printed["name"] == "books"
    assert list(tmp_path.iterdir()) == []
