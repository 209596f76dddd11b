# nixos/options.nix evaluated with ./stub-lib.nix: the option tree of a service as
# plain data, for the contract tests, the fixture renderer and the docs table.
let
  lib = import ./stub-lib.nix;

  declare =
    defaults:
    import ../../nixos/options.nix {
      inherit lib defaults;
      unit = "example";
      defaultPackage = "/nix/store/00000000000000000000000000000000-tsnsrv-0.1.0";
      defaultTailscale = "/nix/store/00000000000000000000000000000000-tailscale-1.98.1";
    };

  # services.tsnsrv.defaults: carries the real defaults.
  defaultsOptions = declare null;
  # services.tsnsrv.services.<name>: every inheritable default is a marker naming the
  # defaults option it must come from.
  serviceOptions = declare (builtins.mapAttrs (name: _: "inherited from defaults.${name}") defaultsOptions);

  # Sub-options are listed for the defaults only: a service's sub-option defaults
  # point into the (here symbolic) defaults.
  summary =
    withSuboptions:
    builtins.mapAttrs (
    _: option:
    {
      type = option.type.description;
      typeMarkdown = option.type.describe (import ./markdown-code.nix);
      inherit (option) description;
      hasDefault = option ? default;
      default = option.default or null;
      defaultText = option.defaultText.text or null;
      example = option.example or null;
    }
    // (
      if withSuboptions && option.type ? options then
        { suboptions = summary false option.type.options; }
      else
        { }
    )
  );
in
{
  defaults = summary true defaultsOptions;
  services = summary false serviceOptions;
  # What every service's options hold when nothing is set but the service itself.
  defaultValues = builtins.mapAttrs (_: option: option.default) defaultsOptions;
}
