# nixos/module.nix evaluated with the real nixpkgs `lib.evalModules`, against minimal
# declarations of the NixOS options it sets and a stub `pkgs` (nothing is built).
#
#   nix-instantiate --eval --strict --json -E \
#     'import tests/nix/eval-module.nix { lib = import <nixpkgs.lib>/lib; configuration = { ... }; }'
{
  lib,
  configuration,
  tailscaleVersion ? "1.98.1",
}:
let
  inherit (lib) mkOption types;

  fakeDerivation =
    name: extra:
    {
      type = "derivation";
      inherit name;
      outPath = "/nix/store/00000000000000000000000000000000-${name}";
    }
    // extra;

  pkgs = {
    callPackage =
      _fn: _args:
      fakeDerivation "tsnsrv-0.1.0" {
        version = "0.1.0";
        meta.mainProgram = "tsnsrv";
      };
    tailscale = fakeDerivation "tailscale-${tailscaleVersion}" { version = tailscaleVersion; };
    coreutils = fakeDerivation "coreutils-9.7" { };
    # The file's name carries a hash of its content, so a test can tell which
    # configuration a unit runs.
    formats.json = _: {
      generate =
        name: value:
        fakeDerivation "${builtins.hashString "sha256" (builtins.toJSON value)}-${name}" {
          passthru.value = value;
        };
    };
    runCommand = name: env: _script: fakeDerivation "${env.raw.name}-checked" { };
    stdenv = {
      buildPlatform.canExecute = _: true;
      hostPlatform = { };
    };
  };

  # nixpkgs' own implementation (nixos/lib/utils.nix).
  utils.escapeSystemdExecArgs = lib.concatMapStringsSep " " (
    arg: lib.replaceStrings [ "%" "$" ] [ "%%" "$$" ] (builtins.toJSON arg)
  );

  # The NixOS options the module sets, declared loosely: the module's own options are
  # what is under test.
  nixosStubs =
    { ... }:
    {
      options = {
        assertions = mkOption {
          type = types.listOf types.unspecified;
          default = [ ];
        };
        warnings = mkOption {
          type = types.listOf types.str;
          default = [ ];
        };
        meta = mkOption {
          type = types.attrsOf types.unspecified;
          default = { };
        };
        systemd.services = mkOption {
          type = types.attrsOf (types.attrsOf types.unspecified);
          default = { };
        };
        services.resolved.enable = mkOption {
          type = types.bool;
          default = false;
        };
        security.acme.certs = mkOption {
          type = types.attrsOf (
            types.submodule (
              { name, ... }:
              {
                options = {
                  directory = mkOption {
                    type = types.str;
                    default = "/var/lib/acme/${name}";
                  };
                  group = mkOption {
                    type = types.str;
                    default = "acme";
                  };
                  reloadServices = mkOption {
                    type = types.listOf types.str;
                    default = [ ];
                  };
                };
              }
            )
          );
          default = { };
        };
      };
    };

  eval = lib.evalModules {
    modules = [
      nixosStubs
      ../../nixos/module.nix
      configuration
      {
        _module.args = { inherit pkgs utils; };
      }
    ];
  };

  inherit (eval) config;
  render = import ../../nixos/render.nix;
  serviceOptions = builtins.removeAttrs (eval.options.services.tsnsrv.services.type.getSubOptions [ ]) [
    "_module"
  ];
  defaultsOptions = builtins.removeAttrs (eval.options.services.tsnsrv.defaults.type.getSubOptions [ ]) [
    "_module"
  ];

  # JSON-safe view of an option: what the docs table and the contract need.
  describe = option: {
    type = option.type.description;
    description = option.description or null;
    default =
      if option ? defaultText then
        option.defaultText.text or option.defaultText
      else if option ? default then
        option.default
      else
        null;
    hasDefault = option ? default || option ? defaultText;
  };
in
{
  failedAssertions = map (a: a.message) (builtins.filter (a: !a.assertion) config.assertions);

  units = lib.mapAttrs (_: unit: {
    inherit (unit) serviceConfig;
    wantedBy = unit.wantedBy or [ ];
    requires = unit.requires or [ ];
    after = unit.after or [ ];
    wants = unit.wants or [ ];
    stopIfChanged = unit.stopIfChanged or true;
    environment = unit.environment or { };
  }) config.systemd.services;

  # What each service's configuration file must hold, and the name it must have.
  expected = lib.mapAttrs (
    unit: service:
    let
      settings = render.serviceConfig {
        inherit unit service;
        acmeDirectory =
          if service.acmeHost != null then config.security.acme.certs.${service.acmeHost}.directory else null;
      };
    in
    {
      inherit settings;
      fileHash = builtins.hashString "sha256" (builtins.toJSON settings);
    }
  ) config.services.tsnsrv.services;

  acmeReloads = lib.mapAttrs (_: cert: cert.reloadServices) config.security.acme.certs;

  options = {
    services = lib.mapAttrs (_: describe) serviceOptions;
    defaults = lib.mapAttrs (_: describe) defaultsOptions;
    defaultValues = lib.mapAttrs (
      name: _: config.services.tsnsrv.defaults.${name}
    ) defaultsOptions;
  };
}
