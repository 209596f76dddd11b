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
  control = import ./headscale.nix { inherit pkgs; };

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
    headscale = control.node;

    server =
      { config, ... }:
      {
        imports = [ (scenarios null).server ];
        specialisation.changed.configuration = (scenarios null).changed;
        security.pki.certificateFiles = [ "${control.tlsCert}/cert.pem" ];
        virtualisation.memorySize = 1536;
        environment.systemPackages = [
          config.services.tsnsrv.defaults.package
          pkgs.curl
        ];
      };

    client = {
      security.pki.certificateFiles = [ "${control.tlsCert}/cert.pem" ];
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
