# Renders the services of a fixture file the way the module does: each service's
# option values are the options' defaults overridden by what the fixture sets.
{
  fixtures ? ./fixtures.nix,
}:
let
  render = import ../../nixos/render.nix;
  inherit (import ./options-eval.nix) defaultValues;
in
builtins.mapAttrs (
  unit: fixture:
  render.serviceConfig {
    inherit unit;
    service =
      defaultValues
      // {
        name = unit;
        toURL = null;
      }
      // fixture.options;
    acmeDirectory = fixture.acmeDirectory or null;
  }
) (import fixtures)
