# The NixOS VM tests of the tsnsrv module, as flake checks (`nix flake check` on a
# Linux host with KVM).
{
  pkgs,
  module,
}:
{
  vm-tailnet = pkgs.testers.runNixOSTest {
    imports = [ ./tailnet.nix ];
    defaults.imports = [ module ];
  };
  # The same tailnet with the trimmed tailscale under every service (docs/trimmed-tailscaled.md).
  vm-tailnet-trimmed = pkgs.testers.runNixOSTest {
    imports = [ ./tailnet.nix ];
    name = pkgs.lib.mkForce "tsnsrv-tailnet-trimmed";
    defaults.imports = [ module ];
    nodes.server.services.tsnsrv.defaults.tailscalePackage =
      pkgs.callPackage ../tailscale-trimmed.nix { };
  };
  vm-oci = pkgs.testers.runNixOSTest {
    imports = [ ./oci.nix ];
    defaults.imports = [ module ];
  };
}
