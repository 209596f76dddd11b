# A whole tailnet in three VMs: headscale (with its embedded DERP, behind nginx with a
# self-signed certificate, as nixpkgs' own headscale test does), a `server` running an
# upstream web application and several services.tsnsrv.services, and alice's `client`
# laptop. The scenarios (./scenarios.nix) are the ones the systemd tier (tests/systemd)
# runs on the same units: readiness, `tsnsrv status`, identity headers and the peer
# check, prefixes and access rules, the host loopback confinement (TCP and UDP, IPv4 and
# IPv6), bulk and websocket traffic under the syscall filter, crashes and restarts of
# either unit, ExecStopPost, and a configuration change.
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

  scenarios =
    switchToChanged:
    import ./scenarios.nix {
      inherit lib pkgs switchToChanged;
      serverLoginServer = "https://headscale";
      clientLoginServer = "https://headscale";
      controlPort = 443;
    };
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
          prefixes = {
            v4 = "100.64.0.0/10";
            v6 = "fd7a:115c:a1e0::/48";
          };
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
        imports = [ (scenarios null).server ];
        specialisation.changed.configuration = (scenarios null).changed;
        security.pki.certificateFiles = [ "${tlsCert}/cert.pem" ];
        virtualisation.memorySize = 1536;
        environment.systemPackages = [
          config.services.tsnsrv.defaults.package
          pkgs.curl
        ];
      };

    client = {
      security.pki.certificateFiles = [ "${tlsCert}/cert.pem" ];
      services.tailscale.enable = true;
      networking.hostName = "client";
      environment.systemPackages = [
        pkgs.curl
        pkgs.jq
        (scenarios null).python
      ];
    };
  };

  testScript =
    { nodes, ... }:
    (scenarios "${nodes.server.system.build.toplevel}/specialisation/changed/bin/switch-to-configuration test")
    .testScript;
}
