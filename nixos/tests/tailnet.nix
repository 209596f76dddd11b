# A whole tailnet in three VMs: headscale (with its embedded DERP, behind nginx with a
# self-signed certificate, as nixpkgs' own headscale test does), a `server` running an
# upstream web application and several services.tsnsrv.services, and alice's `client`
# laptop. It proves what the local end-to-end suite (tests/e2e) proves, through the
# NixOS units: reachability, identity headers, prefixes and access rules, the host
# loopback confinement, node identity across restarts, and readiness.
{ lib, pkgs, ... }:
let
  tlsCert = pkgs.runCommand "headscale-cert" { nativeBuildInputs = [ pkgs.openssl ]; } ''
    openssl req -x509 -newkey rsa:2048 -sha256 -days 365 -nodes \
      -out cert.pem -keyout key.pem \
      -subj '/CN=headscale' -addext "subjectAltName=DNS:headscale"
    mkdir -p $out
    cp key.pem cert.pem $out
  '';

  stunPort = 3478;
  upstreamPort = 3000;
  # A host-loopback-only service that no tailnet peer may reach through a tsnsrv node.
  secretPort = 5432;

  # Answers every request with what it received, as JSON.
  echoUpstream = pkgs.writeScript "echo-upstream" ''
    #!${pkgs.python3.interpreter}
    import json, sys
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Echo(BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps({"path": self.path, "headers": dict(self.headers)}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    ThreadingHTTPServer((sys.argv[1], int(sys.argv[2])), Echo).serve_forever()
  '';

  authKey = "/run/keys/tsnsrv-authkey";
in
{
  name = "tsnsrv-tailnet";
  meta.maintainers = [ ];

  nodes = {
    headscale = {
      services.headscale = {
        enable = true;
        port = 8080;
        settings = {
          server_url = "https://headscale";
          prefixes.v4 = "100.64.0.0/10";
          derp.server = {
            enabled = true;
            region_id = 999;
            stun_listen_addr = "0.0.0.0:${toString stunPort}";
          };
          dns = {
            magic_dns = true;
            base_domain = "tailnet.test";
            override_local_dns = false;
          };
        };
      };
      services.nginx = {
        enable = true;
        virtualHosts.headscale = {
          addSSL = true;
          sslCertificate = "${tlsCert}/cert.pem";
          sslCertificateKey = "${tlsCert}/key.pem";
          locations."/" = {
            proxyPass = "http://127.0.0.1:8080";
            proxyWebsockets = true;
          };
        };
      };
      networking.firewall = {
        allowedTCPPorts = [
          80
          443
        ];
        allowedUDPPorts = [ stunPort ];
      };
      environment.systemPackages = [ pkgs.headscale ];
    };

    server =
      { config, ... }:
      {
        security.pki.certificateFiles = [ "${tlsCert}/cert.pem" ];
        virtualisation.memorySize = 1536;

        services.tsnsrv = {
          enable = true;
          defaults = {
            loginServerUrl = "https://headscale";
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
            # The confinement switched off, to prove that the loopback check below
            # detects the hole it closes.
            leaky = { };
          };
        };
        systemd.services = lib.mkMerge [
          {
            echo-upstream = {
              wantedBy = [ "multi-user.target" ];
              serviceConfig.ExecStart = "${echoUpstream} 127.0.0.1 ${toString upstreamPort}";
            };
            loopback-secret = {
              wantedBy = [ "multi-user.target" ];
              serviceConfig.ExecStart = "${echoUpstream} 127.0.0.1 ${toString secretPort}";
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
          (lib.genAttrs
            (map (name: "tsnsrv-${name}") [
              "web"
              "api"
              "alerts"
              "quiet"
              "leaky"
            ])
            (_: {
              unitConfig.ConditionPathExists = authKey;
            })
          )
        ];
        environment.systemPackages = [ config.services.tsnsrv.defaults.package ];
      };

    client = {
      security.pki.certificateFiles = [ "${tlsCert}/cert.pem" ];
      services.tailscale.enable = true;
      networking.hostName = "client";
      environment.systemPackages = [ pkgs.jq ];
    };
  };

  testScript = ''
    import json

    start_all()
    headscale.wait_for_unit("headscale.service")
    headscale.wait_for_open_port(443)
    headscale.wait_until_succeeds("headscale users list")

    def preauth_key(user, *extra):
        headscale.succeed(f"headscale users create {user}")
        users = json.loads(headscale.succeed("headscale users list -o json"))
        user_id = next(u["id"] for u in users if u["name"] == user)
        return headscale.succeed(f"headscale preauthkeys create --reusable -e 1h -u {user_id} {' '.join(extra)}").strip()

    def nodes():
        return json.loads(headscale.succeed("headscale nodes list -o json"))

    def node_ip(name):
        found = [n for n in nodes() if n["given_name"] == name]
        assert len(found) == 1, f"expected one node {name}, got {[n['given_name'] for n in nodes()]}"
        return next(ip for ip in found[0]["ip_addresses"] if "." in ip)

    # alice's laptop joins as a user.
    client.wait_for_unit("tailscaled.service")
    alice_key = preauth_key("alice")
    client.succeed(f"tailscale up --login-server=https://headscale --auth-key={alice_key}")

    # The services join with their own key, handed over by LoadCredential=.
    server_key = preauth_key("services")
    server.succeed(f"mkdir -p /run/keys && echo '{server_key}' > ${authKey} && chmod 0400 ${authKey}")
    for name in ["web", "api", "alerts", "quiet", "leaky", "pending"]:
        server.systemctl(f"start --no-block tsnsrv-{name}.service")

    with subtest("units become active (READY=1) only once they serve"):
        for name in ["web", "api", "alerts", "quiet", "leaky"]:
            server.wait_for_unit(f"tsnsrv-{name}.service")
            server.succeed(f"systemctl is-active tsnsrv-{name}-tailscaled.service")
        # Ready means the node is up and the Serve config is set: it is on the tailnet now.
        web = node_ip("web")
        client.wait_until_succeeds(f"tailscale ping -c 1 {web}")
        client.succeed(f"curl -fsS --max-time 10 http://{web}/")
        # The service without a key never logs in, so it must still be starting.
        state = server.succeed("systemctl show -P ActiveState tsnsrv-pending.service").strip()
        assert state == "activating", f"tsnsrv-pending is {state}, but it has no node"
        server.succeed("tsnsrv status")

    with subtest("requests arrive upstream with the client's identity"):
        answer = json.loads(client.succeed(f"curl -fsS http://{web}/hello?q=1"))
        assert answer["path"] == "/hello?q=1", answer
        headers = {k.lower(): v for k, v in answer["headers"].items()}
        assert "alice" in headers["x-tailscale-user-loginname"], headers
        assert "alice" in headers["tailscale-user-login"], headers
        # A spoofed identity header from the client is replaced, not passed on.
        answer = json.loads(client.succeed(f"curl -fsS -H 'X-Tailscale-User-LoginName: mallory' http://{web}/"))
        assert "mallory" not in json.dumps(answer["headers"]), answer

    with subtest("suppressWhois reaches the runtime"):
        quiet = node_ip("quiet")
        client.wait_until_succeeds(f"tailscale ping -c 1 {quiet}")
        answer = json.loads(client.succeed(f"curl -fsS http://{quiet}/"))
        assert not any(k.lower().startswith("x-tailscale-user") for k in answer["headers"]), answer

    with subtest("prefixes, deny prefixes and access rules"):
        client.succeed(f"curl -sS -o /dev/null -w '%{{http_code}}' http://{web}/private/x | grep -qx 404")
        api = node_ip("api")
        client.wait_until_succeeds(f"tailscale ping -c 1 {api}")
        answer = json.loads(client.succeed(f"curl -fsS http://{api}/api/v1/items"))
        assert answer["path"] == "/v1/items", answer
        assert {k.lower(): v for k, v in answer["headers"].items()}.get("x-from-tsnsrv") == "api", answer
        client.succeed(f"curl -sS -o /dev/null -w '%{{http_code}}' http://{api}/elsewhere | grep -qx 404")
        alerts = node_ip("alerts")
        client.wait_until_succeeds(f"tailscale ping -c 1 {alerts}")
        client.succeed(f"curl -sS -o /dev/null -w '%{{http_code}}' http://{alerts}/ | grep -qx 403")

    with subtest("host loopback is not reachable through a service node"):
        server.succeed("curl -fsS http://127.0.0.1:${toString secretPort}/")
        client.fail(f"curl -fsS --max-time 10 http://{web}:${toString secretPort}/")
        # The same request through the unconfined node works: the check above is not vacuous.
        leaky = node_ip("leaky")
        client.wait_until_succeeds(f"tailscale ping -c 1 {leaky}")
        client.succeed(f"curl -fsS --max-time 10 http://{leaky}:${toString secretPort}/")

    with subtest("a restart keeps the node"):
        before = node_ip("web")
        server.systemctl("restart tsnsrv-web-tailscaled.service tsnsrv-web.service")
        server.wait_for_unit("tsnsrv-web.service")
        assert node_ip("web") == before
        assert not any(n["given_name"].startswith("web-") for n in nodes()), nodes()
        client.wait_until_succeeds(f"curl -fsS --max-time 10 http://{web}/")
  '';
}
