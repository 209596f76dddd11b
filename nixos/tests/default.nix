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
  vm-oci = pkgs.testers.runNixOSTest {
    imports = [ ./oci.nix ];
    defaults.imports = [ module ];
  };
}
