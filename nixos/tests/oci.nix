# virtualisation.oci-sidecars.tsnsrv in two VMs: headscale (./headscale.nix) and `machine`,
# a podman host with an app container `web-server` and two sidecars for it, one by toURL
# and one by urlParts, as the Go tsnsrv's e2e/oci test has them; the host's own tailscale
# is the client. Beyond the Go test's scenario: identity headers, the app's loopback (TCP
# and UDP) unreachable through the sidecar's node, a restart keeping the node, and the
# sidecar running without capabilities on a read-only root.
{ lib, pkgs, ... }:
let
  control = import ./headscale.nix { inherit pkgs; };

  upstreamPort = 3000;
  # Listening only on the app container's loopback: no peer may reach it through a node.
  secretPort = 5432;
  authKey = "/run/keys/tsnsrv-authkey";
  inherit (import ./upstream.nix { inherit pkgs; }) python upstream;

  appImage = pkgs.dockerTools.buildLayeredImage {
    name = "web-server";
    tag = "latest";
    contents = [ pkgs.busybox ];
    config.Cmd = [
      "/bin/sh"
      "-c"
      "${upstream secretPort "--udp"} & exec ${upstream upstreamPort ""}"
    ];
  };

  sidecars = [
    "web-server-basic"
    "web-server-urlparts"
  ];
  sidecarList = lib.concatMapStringsSep ", " (name: ''"${name}"'') sidecars;
in
{
  name = "tsnsrv-oci";
  meta.maintainers = [ ];

  nodes = {
    headscale = control.node;

    machine =
      { config, ... }:
      {
        security.pki.certificateFiles = [ "${control.tlsCert}/cert.pem" ];
        virtualisation.memorySize = 2048;
        virtualisation.diskSize = 4096;
        services.tailscale.enable = true;
        environment.systemPackages = [
          config.services.tsnsrv.defaults.package
          pkgs.curl
          pkgs.jq
          python
        ];

        services.tsnsrv.defaults = {
          loginServerUrl = "https://headscale";
          authKeyPath = authKey;
          # headscale cannot issue certificates.
          plaintext = true;
        };
        virtualisation.oci-sidecars.tsnsrv = {
          enable = true;
          containers.web-server-basic = {
            forContainer = "web-server";
            service.toURL = "http://127.0.0.1:${toString upstreamPort}";
          };
          containers.web-server-urlparts = {
            forContainer = "web-server";
            service.urlParts.port = upstreamPort;
          };
        };

        virtualisation.oci-containers = {
          backend = "podman";
          containers = {
            web-server = {
              image = "web-server:latest";
              imageFile = appImage;
            };
          }
          # The sidecars' tailscaled must trust headscale's self-signed certificate.
          // lib.genAttrs sidecars (_: {
            volumes = [ "${control.tlsCert}/cert.pem:/etc/headscale-ca.pem:ro" ];
            environment.SSL_CERT_FILE = "/etc/headscale-ca.pem";
          });
        };
        # Containers resolve `headscale` through podman's DNS.
        virtualisation.podman.defaultNetwork.settings.dns_enabled = true;
        networking.firewall.trustedInterfaces = [ "podman0" ];

        # The key is written by the test script, once headscale has issued it: until then
        # neither the app (which upholds its sidecars) nor the sidecars start.
        systemd.services = lib.genAttrs (map (name: "podman-${name}") ([ "web-server" ] ++ sidecars)) (_: {
          unitConfig.ConditionPathExists = authKey;
        });
      };
  };

  testScript = builtins.readFile ./helpers.py + ''
    def health_query(sidecar):
        # The control socket is on the sidecar's state volume.
        return f"curl -fsS --unix-socket /var/lib/podman-{sidecar}/control.sock http://sidecar/health"

    def health(sidecar):
        return json.loads(machine.succeed(health_query(sidecar)))

    def wait_ready(sidecar):
        machine.wait_for_unit(f"podman-{sidecar}.service")
        machine.wait_until_succeeds(f"{health_query(sidecar)} | jq -e .ready")
        ip = node_ip(sidecar)
        machine.wait_until_succeeds(f"tailscale ping -c 1 {ip}")
        return ip

    start_all()
    headscale.wait_for_unit("headscale.service")
    headscale.wait_for_open_port(443)
    headscale.wait_until_succeeds("headscale users list")

    machine.wait_for_unit("tailscaled.service")
    machine.succeed(f"tailscale up --login-server=https://headscale --auth-key={preauth_key('alice')}")
    key = preauth_key("containers")
    machine.succeed(f"mkdir -p /run/keys && echo '{key}' > ${authKey} && chmod 0400 ${authKey}")
    # The app's unit upholds its sidecars: starting it brings them up.
    machine.succeed("systemctl start podman-web-server.service")

    for sidecar in [${sidecarList}]:
        with subtest(f"{sidecar} puts the app on the tailnet, with identity headers"):
            ip = wait_ready(sidecar)
            answer = json.loads(machine.succeed(f"curl -fsS --max-time 20 '{url(ip, '/hello?q=1')}'"))
            headers = {name.lower(): value for name, value in answer["headers"].items()}
            assert answer["path"] == "/hello", answer
            assert "alice" in headers["x-tailscale-user-loginname"], headers
            assert headers["x-tailscale-node-name"] == "machine", headers

    with subtest("tsnsrv status on the host finds the sidecars by their state volumes"):
        listed = {health["name"]: health for health in json.loads(machine.succeed("tsnsrv status --json"))}
        assert set(listed) == {${sidecarList}}, listed
        assert all(health["ready"] for health in listed.values()), listed

    with subtest("the app's loopback (TCP and UDP) is not reachable through the sidecar's node"):
        # It is there: inside the app's network, 127.0.0.1:${toString secretPort} answers.
        machine.succeed("podman exec web-server wget -qO- http://127.0.0.1:${toString secretPort}/")
        assert health("web-server-basic")["tailscaled"]["loopbackGuard"] == "seccomp"
        for ip in node_ips("web-server-basic"):
            machine.fail(f"curl -fsS --max-time 10 {url(ip, port=${toString secretPort})}")
            assert python_on(machine, UDP_PROBE, ip, "${toString secretPort}").strip() == "no answer", ip
        # grep -c reads all of it (-q would stop early, and pipefail would see podman's SIGPIPE).
        machine.wait_until_succeeds("podman logs web-server-basic 2>&1 | grep -c 'refused tailscaled.s connection to host loopback'", timeout=30)

    with subtest("the sidecar runs as 65532 without capabilities, on a read-only root"):
        # Seen from the host: the image has no shell tools.
        pid = machine.succeed("podman inspect --format '{{.State.Pid}}' web-server-basic").strip()
        status = machine.succeed(f"cat /proc/{pid}/status")
        fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
        assert fields["Uid"].split()[0] == "65532", fields["Uid"]
        assert fields["CapEff"].strip() == "0000000000000000", fields["CapEff"]
        assert fields["NoNewPrivs"].strip() == "1", fields["NoNewPrivs"]
        assert machine.succeed("podman inspect --format '{{.HostConfig.ReadonlyRootfs}}' web-server-basic").strip() == "true"
        machine.fail(f"touch /proc/{pid}/root/written")

    with subtest("a restart keeps the node"):
        before = node_ips("web-server-basic")
        machine.succeed("systemctl restart podman-web-server-basic.service")
        wait_ready("web-server-basic")
        assert node_ips("web-server-basic") == before
        machine.succeed(f"curl -fsS --max-time 20 {url(before[0])}")
  '';
}
