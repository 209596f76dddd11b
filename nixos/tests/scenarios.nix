# The tailnet scenarios: what the module's units must do, as a NixOS test script and the
# `server` configuration it runs against. One source for two runners:
#
# - ./tailnet.nix, the NixOS VM test (`nix flake check` on a NixOS host with KVM), with
#   headscale behind nginx's TLS in a VM of its own;
# - tests/systemd, which renders the same units as NixOS writes them, boots them under
#   systemd in a QEMU guest, and runs this script through a small driver with the
#   test-driver methods it uses (the headscale machine and the client are on the host).
{
  lib,
  pkgs,
  # The control server's URL, as the server's services and as the client reach it.
  serverLoginServer,
  clientLoginServer,
  # The port to wait for on the `headscale` machine.
  controlPort,
  # A shell command on `server` that switches it to the `changed` configuration.
  switchToChanged,
}:
let
  upstreamPort = 3000;
  # A host-loopback-only service (TCP and UDP) that no tailnet peer may reach through a node.
  secretPort = 5432;
  authKey = "/run/keys/tsnsrv-authkey";
  inherit (import ./upstream.nix { inherit pkgs; }) python upstream;
  keyed = [
    "web"
    "api"
    "alerts"
    "quiet"
    "leaky"
  ];
  keyedList = lib.concatMapStringsSep ", " (name: ''"${name}"'') keyed;
in
{
  inherit authKey python;

  server = {
    services.tsnsrv = {
      enable = true;
      defaults = {
        loginServerUrl = serverLoginServer;
        authKeyPath = authKey;
        # headscale cannot issue certificates.
        plaintext = true;
        urlParts.port = upstreamPort;
        tailscaledVerbose = true;
      };
      services = {
        web = {
          toURL = "http://127.0.0.1:${toString upstreamPort}";
          denyPrefixes = [ "/private" ];
          identityHeaders = [
            "tsnsrv"
            "serve"
          ];
          assertions = true;
        };
        # Built from urlParts, with prefixes.
        api = {
          prefixes = [ "/api/" ];
          stripPrefix = true;
          upstreamHeaders.X-From-Tsnsrv = "api";
        };
        # The blog post's alertmanager: nobody but the owner's other laptop.
        alerts = {
          accessRules = [
            "allow node:owners-phone"
            "deny"
          ];
        };
        # Declared but not passed through by the Go module.
        quiet.suppressWhois = true;
        # No key: it waits for an interactive login, so it must never report ready.
        pending.authKeyPath = null;
        # The confinement switched off, to prove that the loopback checks detect the
        # hole they close.
        leaky = { };
      };
    };
    systemd.services = lib.mkMerge [
      {
        echo-upstream = {
          wantedBy = [ "multi-user.target" ];
          serviceConfig.ExecStart = upstream upstreamPort "";
        };
        loopback-secret = {
          wantedBy = [ "multi-user.target" ];
          serviceConfig.ExecStart = upstream secretPort "--udp";
        };
        tsnsrv-leaky-tailscaled.serviceConfig = {
          IPAddressDeny = lib.mkForce "";
          IPAddressAllow = lib.mkForce "";
        };
        # Started by the test script and left waiting for its login; it must not
        # hold up boot or be killed by the start timeout meanwhile.
        tsnsrv-pending = {
          wantedBy = lib.mkForce [ ];
          serviceConfig.TimeoutStartSec = "infinity";
        };
      }
      # The key is written by the test script, once headscale has issued it.
      (lib.genAttrs (map (name: "tsnsrv-${name}") keyed) (_: {
        unitConfig.ConditionPathExists = authKey;
      }))
    ];
  };

  # A configuration change for `web` only: `switchToChanged` moves `server` to it.
  changed = {
    services.tsnsrv.services.web.denyPrefixes = lib.mkForce [
      "/private"
      "/changed"
    ];
  };

  testScript = builtins.readFile ./helpers.py + ''
    def status_code(target):
        return client.succeed(f"curl -sS -o /dev/null -w '%{{http_code}}' --max-time 20 '{target}'").strip()

    start_all()
    headscale.wait_for_unit("headscale.service")
    headscale.wait_for_open_port(${toString controlPort})
    headscale.wait_until_succeeds("headscale users list")

    def main_pid(unit):
        return server.succeed(f"systemctl show -P MainPID {unit}").strip()

    # alice's laptop joins as a user.
    client.wait_for_unit("tailscaled.service")
    alice_key = preauth_key("alice")
    client.succeed(f"tailscale up --login-server=${clientLoginServer} --auth-key={alice_key}")

    # The services join with their own key, handed over by LoadCredential= from a file
    # only root may read.
    server_key = preauth_key("services")
    server.succeed(f"mkdir -p /run/keys && echo '{server_key}' > ${authKey} && chmod 0400 ${authKey}")
    for name in [${keyedList}, "pending"]:
        server.systemctl(f"start --no-block tsnsrv-{name}.service")

    with subtest("units become active (READY=1) only once they serve"):
        for name in [${keyedList}]:
            server.wait_for_unit(f"tsnsrv-{name}.service")
            server.succeed(f"systemctl is-active tsnsrv-{name}-tailscaled.service")
        # Ready means the node is up and the Serve config is set: it is on the tailnet now.
        web = node_ip("web")
        client.wait_until_succeeds(f"tailscale ping -c 1 {web}")
        client.succeed(f"curl -fsS --max-time 20 {url(web)}")
        # The service without a key never logs in, so it must still be starting.
        state = server.succeed("systemctl show -P ActiveState tsnsrv-pending.service").strip()
        assert state == "activating", f"tsnsrv-pending is {state}, but it has no node"

    with subtest("tsnsrv status shows the admin every service, and which is not ready"):
        table = server.succeed("tsnsrv status ${lib.concatStringsSep " " keyed}")
        for name in [${keyedList}]:
            assert any(line.split()[:2] == [name, "serving"] for line in table.splitlines()), table
        code, table = server.execute("tsnsrv status")
        assert code == 1, f"tsnsrv status exited {code} although tsnsrv-pending is not ready:\n{table}"
        assert any(line.split()[0] == "pending" and "NeedsLogin" in line for line in table.splitlines()[1:]), table

    with subtest("requests arrive upstream with the client's identity"):
        answer = json.loads(client.succeed(f"curl -fsS '{url(web, '/hello?q=1')}'"))
        assert answer["path"] == "/hello?q=1", answer
        headers = {k.lower(): v for k, v in answer["headers"].items()}
        assert "alice" in headers["x-tailscale-user-loginname"], headers
        assert "alice" in headers["tailscale-user-login"], headers
        # A spoofed identity header from the client is replaced, not passed on.
        answer = json.loads(client.succeed(f"curl -fsS -H 'X-Tailscale-User-LoginName: mallory' {url(web)}"))
        assert "mallory" not in json.dumps(answer["headers"]), answer

    with subtest("the upstream can verify the identity assertion; the daemon unit cannot read the signing keys"):
        answer = json.loads(client.succeed(f"curl -fsS {url(web, '/asserted')}"))
        assertion = {k.lower(): v for k, v in answer["headers"].items()}["x-tailscale-identity-assertion"]
        verify = (
            "import json, sys, jwt\n"
            "keys = {k.key_id: k for k in jwt.PyJWKSet.from_json(open(sys.argv[1]).read()).keys}\n"
            "key = keys[jwt.get_unverified_header(sys.argv[2])['kid']]\n"
            "claims = jwt.decode(sys.argv[2], key, algorithms=['EdDSA'], audience='web', options={'require': ['exp']})\n"
            "print(json.dumps(claims))\n"
        )
        encoded = base64.b64encode(verify.encode()).decode()
        claims = json.loads(server.succeed(
            f"${python.interpreter} -c 'import base64; exec(base64.b64decode(\"{encoded}\"))' "
            f"/run/tsnsrv-jwks.d/web.json {assertion}"
        ))
        assert "alice" in claims["login"] and claims["node"] == "client", claims
        assert server.succeed("stat -c %a /run/tsnsrv-jwks.d/web.json").strip() == "644"
        proxy, daemon = main_pid("tsnsrv-web.service"), main_pid("tsnsrv-web-tailscaled.service")
        ids = server.succeed(f"stat -c '-S %u -G %g' /proc/{proxy}").strip()
        keys = "/var/lib/tsnsrv-keys.d/web/keys.json"
        # The same dynamic user: the proxy's mount namespace has the keys, the daemon's not.
        server.succeed(f"nsenter -t {proxy} -m {ids} cat {keys} > /dev/null")
        server.fail(f"nsenter -t {daemon} -m {ids} cat {keys}")

    with subtest("the proxy knows tailscaled by uid and file descriptor, and refuses its impostors"):
        [health] = json.loads(server.succeed("tsnsrv status --json web"))
        assert health["serve"]["peerCheck"] == "uid and fd", health["serve"]
        front_host, front_port = health["serve"]["front"].rsplit(":", 1)
        # A process of the same (dynamic) user that is not tailscaled claims to be alice.
        forger = (
            "import socket, struct, sys\n"
            "src, dst = socket.inet_aton(sys.argv[3]), socket.inet_aton('127.0.0.2')\n"
            "header = b'\\r\\n\\r\\n\\x00\\r\\nQUIT\\n' + bytes([0x21, 0x11]) + struct.pack('!H', 12)\n"
            "header += src + dst + struct.pack('!HH', 40000, 80)\n"
            "with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10) as s:\n"
            "    s.sendall(header + b'GET /forged HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n')\n"
            "    try:\n"
            "        answer = s.recv(100)\n"
            "    except OSError:\n"
            "        answer = bytes()\n"
            "print(answer.split(b'\\r\\n')[0].decode() if answer else 'closed without an answer')\n"
        )
        encoded = base64.b64encode(forger.encode()).decode()
        out = server.succeed(
            "systemd-run --quiet --wait --pipe -p DynamicUser=yes -p User=tsnsrv-web "
            f"${pkgs.python3.interpreter} -c 'import base64; exec(base64.b64decode(\"{encoded}\"))' "
            f"{front_host} {front_port} {client.succeed('tailscale ip -4').strip()}"
        )
        assert out.strip() == "closed without an answer", out

    with subtest("suppressWhois reaches the runtime"):
        quiet = node_ip("quiet")
        client.wait_until_succeeds(f"tailscale ping -c 1 {quiet}")
        answer = json.loads(client.succeed(f"curl -fsS {url(quiet)}"))
        assert not any(k.lower().startswith("x-tailscale-user") for k in answer["headers"]), answer

    with subtest("prefixes, deny prefixes and access rules"):
        assert status_code(url(web, "/private/x")) == "404"
        api = node_ip("api")
        client.wait_until_succeeds(f"tailscale ping -c 1 {api}")
        answer = json.loads(client.succeed(f"curl -fsS {url(api, '/api/v1/items')}"))
        assert answer["path"] == "/v1/items", answer
        assert {k.lower(): v for k, v in answer["headers"].items()}.get("x-from-tsnsrv") == "api", answer
        assert status_code(url(api, "/elsewhere")) == "404"
        alerts = node_ip("alerts")
        client.wait_until_succeeds(f"tailscale ping -c 1 {alerts}")
        assert status_code(url(alerts)) == "403"

    with subtest("host loopback (TCP and UDP, over IPv4 and IPv6) is not reachable through a service node"):
        server.succeed("curl -fsS http://127.0.0.1:${toString secretPort}/")
        leaky_ips = node_ips("leaky")
        client.wait_until_succeeds(f"tailscale ping -c 1 {leaky_ips[0]}")
        web_ips = node_ips("web")
        assert len(web_ips) == 2 and len(leaky_ips) == 2, (web_ips, leaky_ips)
        for ip in web_ips:
            client.fail(f"curl -fsS --max-time 10 {url(ip, port=${toString secretPort})}")
            assert python_on(client, UDP_PROBE, ip, "${toString secretPort}").strip() == "no answer", ip
        # The same through the unconfined node works: the checks above are not vacuous.
        for ip in leaky_ips:
            client.succeed(f"curl -fsS --max-time 10 {url(ip, port=${toString secretPort})}")
            assert python_on(client, UDP_PROBE, ip, "${toString secretPort}").strip() == "private ping", ip

    with subtest("1 GiB and websocket traffic trip no system call filter"):
        size = 1 << 30
        got = client.succeed(f"curl -fsS --max-time 1800 -o /dev/null -w '%{{size_download}}' {url(web, f'/bytes/{size}')}")
        assert int(got) == size, got
        ws_client = (
            "import asyncio, sys, websockets\n"
            "async def main():\n"
            "    async with websockets.connect(sys.argv[1], max_size=None) as ws:\n"
            "        for i in range(100):\n"
            "            await ws.send(f'message {i}')\n"
            "            assert await ws.recv() == f'message {i}'\n"
            "        await ws.send(b'x' * (1 << 20))\n"
            "        assert len(await ws.recv()) == 1 << 20\n"
            "    print('ok')\n"
            "asyncio.run(main())\n"
        )
        assert python_on(client, ws_client, f"ws://{web}/ws").strip() == "ok"
        for unit in ["tsnsrv-web.service", "tsnsrv-web-tailscaled.service"]:
            assert server.succeed(f"systemctl show -P NRestarts {unit}").strip() == "0", unit
        server.fail("journalctl -o cat -u tsnsrv-web.service -u tsnsrv-web-tailscaled.service | grep -E '31/SYS|SIGSYS'")

    with subtest("a crashed proxy leaves no Serve config behind (ExecStopPost), and comes back"):
        before = main_pid("tsnsrv-web.service")
        # Within RestartSec, before the proxy is back and sets it again.
        server.succeed(
            "systemctl kill -s KILL tsnsrv-web.service; "
            "for i in $(seq 50); do "
            "  [ \"$(${pkgs.tailscale}/bin/tailscale --socket=/run/tsnsrv-web/tailscaled.sock serve status --json)\" = '{}' ] && exit 0; "
            "  sleep 0.1; "
            "done; exit 1"
        )
        server.wait_until_succeeds(f"test \"$(systemctl show -P MainPID tsnsrv-web.service)\" != {before}")
        server.wait_for_unit("tsnsrv-web.service")
        client.wait_until_succeeds(f"curl -fsS --max-time 10 {url(web)}")

    with subtest("kill -9 of the tailscaled unit: systemd restarts it, the proxy reattaches, the node stays"):
        before = main_pid("tsnsrv-web-tailscaled.service")
        server.succeed("systemctl kill -s KILL tsnsrv-web-tailscaled.service")
        server.wait_until_succeeds(f"test \"$(systemctl show -P MainPID tsnsrv-web-tailscaled.service)\" != {before}")
        client.wait_until_succeeds(f"curl -fsS --max-time 10 {url(web)}")
        assert node_ip("web") == web
        assert not any(n["given_name"].startswith("web-") for n in nodes()), nodes()

    with subtest("a restart keeps the node"):
        server.systemctl("restart tsnsrv-web-tailscaled.service tsnsrv-web.service")
        server.wait_for_unit("tsnsrv-web.service")
        assert node_ip("web") == web
        assert not any(n["given_name"].startswith("web-") for n in nodes()), nodes()
        client.wait_until_succeeds(f"curl -fsS --max-time 10 {url(web)}")

    with subtest("a configuration change restarts the proxy in one step and keeps its tailscaled"):
        daemon = main_pid("tsnsrv-web-tailscaled.service")
        proxy = main_pid("tsnsrv-web.service")
        assert status_code(url(web, "/changed")) == "200"
        server.succeed("${switchToChanged}")
        server.wait_for_unit("tsnsrv-web.service")
        assert main_pid("tsnsrv-web.service") != proxy
        client.wait_until_succeeds(f"curl -sS -o /dev/null -w '%{{http_code}}' --max-time 10 {url(web, '/changed')} | grep -qx 404")
        assert main_pid("tsnsrv-web-tailscaled.service") == daemon
  '';
}
