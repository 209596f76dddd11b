# nixos/module.nix evaluated with the real nixpkgs `lib.evalModules`, against minimal
# declarations of the NixOS options it sets and a stub `pkgs` (nothing is built).
#
#   nix-instantiate --eval --strict --json -E \
#     'import tests/nix/eval-module.nix { lib = import <nixpkgs.lib>/lib; configuration = { ... }; }'
{
  lib,
  configuration,
  # More modules, e.g. the VM test's `server` (nixos/tests/scenarios.nix).
  modules ? [ ],
  tailscaleVersion ? "1.98.1",
}:
let
  inherit (lib) mkOption types;

  pkgs = import ./stub-pkgs.nix { inherit lib tailscaleVersion; };

  # nixpkgs' own implementation (nixos/lib/utils.nix).
  utils.escapeSystemdExecArgs = lib.concatMapStringsSep " " (
    arg: lib.replaceStrings [ "%" "$" ] [ "%%" "$$" ] (builtins.toJSON arg)
  );

  # nixos/lib/systemd-unit-options.nix's unit option values: lists concatenate, other
  # values must agree.
  unitOption = types.mkOptionType {
    name = "systemd option";
    merge =
      loc: defs:
      if lib.any (def: builtins.isList def.value) defs then
        lib.concatMap (def: lib.toList def.value) defs
      else
        lib.mergeEqualOption loc defs;
  };
  listOption = mkOption {
    type = types.listOf types.str;
    default = [ ];
  };
  # The parts of NixOS's systemd.services.<name> that the module and the VM test use.
  systemdService = {
    options = {
      description = mkOption {
        type = types.str;
        default = "";
      };
      wantedBy = listOption;
      requires = listOption;
      wants = listOption;
      after = listOption;
      before = listOption;
      environment = mkOption {
        type = types.attrsOf (types.nullOr (types.either types.str types.package));
        default = { };
      };
      path = mkOption {
        type = types.listOf types.package;
        default = [ ];
      };
      serviceConfig = mkOption {
        type = types.attrsOf unitOption;
        default = { };
      };
      unitConfig = mkOption {
        type = types.attrsOf unitOption;
        default = { };
      };
      stopIfChanged = mkOption {
        type = types.bool;
        default = true;
      };
      restartIfChanged = mkOption {
        type = types.bool;
        default = true;
      };
      reloadIfChanged = mkOption {
        type = types.bool;
        default = false;
      };
    };
  };

  # The NixOS options the module sets, declared loosely where only the module's own
  # options are under test.
  nixosStubs =
    { config, ... }:
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
          type = types.attrsOf (types.submodule systemdService);
          default = { };
        };
        # nixos/modules/system/boot/systemd/tmpfiles.nix and users-groups.nix, the parts
        # the module sets for the assertion keys' directory.
        systemd.tmpfiles.rules = listOption;
        users.groups = mkOption {
          type = types.attrsOf (types.submodule { options.gid = mkOption { type = types.nullOr types.int; default = null; }; });
          default = { };
        };
        systemd.globalEnvironment = mkOption {
          type = types.attrsOf types.str;
          default = {
            TZDIR = "/etc/zoneinfo";
            LOCALE_ARCHIVE = "${pkgs.glibcLocales}/lib/locale/locale-archive";
          };
        };
        # nixos/modules/virtualisation/oci-containers.nix, the parts sidecars use.
        virtualisation.oci-containers = {
          backend = mkOption {
            type = types.enum [
              "podman"
              "docker"
            ];
            default = "podman";
          };
          containers = mkOption {
            type = types.attrsOf (
              types.submodule (
                { name, ... }:
                {
                options = {
                  serviceName = mkOption {
                    type = types.str;
                    default = "${config.virtualisation.oci-containers.backend}-${name}";
                  };
                  image = mkOption { type = types.str; };
                  imageFile = mkOption {
                    type = types.nullOr types.package;
                    default = null;
                  };
                  cmd = listOption;
                  volumes = listOption;
                  extraOptions = listOption;
                  dependsOn = listOption;
                  user = mkOption {
                    type = types.nullOr types.str;
                    default = null;
                  };
                  environment = mkOption {
                    type = types.attrsOf types.str;
                    default = { };
                  };
                };
                }
              )
            );
            default = { };
          };
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

  # What nixos/modules/virtualisation/oci-containers.nix writes into each container's
  # unit, where the sidecars' own settings must merge with it: its pre-start step, the
  # dependencies, and for podman a runtime directory named after the container.
  ociContainerUnits =
    { config, ... }:
    let
      inherit (config.virtualisation.oci-containers) backend containers;
      # (A container that does not exist is left for the sidecars' assertion to name,
      # which NixOS reports before it looks at any unit.)
      unitsOf = map (c: "${containers.${c}.serviceName or c}.service");
    in
    {
      systemd.services = lib.mapAttrs' (
        name: container:
        lib.nameValuePair container.serviceName {
          after = unitsOf container.dependsOn;
          requires = unitsOf container.dependsOn;
          serviceConfig = {
            ExecStartPre = [ "/nix/store/00000000000000000000000000000000-pre-start/bin/pre-start" ];
            Restart = "always";
          }
          // lib.optionalAttrs (backend == "podman") {
            Type = "notify";
            RuntimeDirectory = name;
          };
        }
      ) containers;
    };

  eval = lib.evalModules {
    modules = [
      nixosStubs
      ociContainerUnits
      ../../nixos/module.nix
      configuration
      {
        _module.args = { inherit pkgs utils; };
      }
    ]
    ++ modules;
  };

  inherit (eval) config;
  render = import ../../nixos/render.nix;
  # The documented options: not the hidden ones that refuse the Go tsnsrv's options.
  documented =
    options: lib.filterAttrs (name: option: name != "_module" && (option.visible or true) != false) options;
  serviceOptions = documented (eval.options.services.tsnsrv.services.type.getSubOptions [ ]);
  defaultsOptions = documented (eval.options.services.tsnsrv.defaults.type.getSubOptions [ ]);

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

  tmpfilesRules = config.systemd.tmpfiles.rules;
  groups = builtins.attrNames config.users.groups;

  units = lib.mapAttrs (_: unit: {
    inherit (unit) serviceConfig unitConfig;
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

  containers = config.virtualisation.oci-containers.containers;

  # What each sidecar's configuration file must hold (and the hash in its name).
  expectedSidecars = lib.mapAttrs (
    name: sidecar:
    let
      settings = render.sidecarConfig {
        name = sidecar.service.name;
        service = sidecar.service // {
          authKeyPath =
            if sidecar.service.authKeyPath != null then
              sidecar.service.authKeyPath
            else
              config.virtualisation.oci-sidecars.tsnsrv.authKeyPath;
        };
        credentialsDir = "/run/tsnsrv-credentials";
      };
    in
    {
      inherit settings;
      fileHash = builtins.hashString "sha256" (builtins.toJSON settings);
    }
  ) config.virtualisation.oci-sidecars.tsnsrv.containers;

  # The unit files as NixOS writes them.
  unitFiles = (import ./systemd-units.nix { inherit lib; }).render {
    services = config.systemd.services;
    inherit (config.systemd) globalEnvironment;
    defaultPath = with pkgs; [
      coreutils
      findutils
      gnugrep
      gnused
      systemd
    ];
  };

  options = {
    services = lib.mapAttrs (_: describe) serviceOptions;
    defaults = lib.mapAttrs (_: describe) defaultsOptions;
    defaultValues = lib.mapAttrs (
      name: _: config.services.tsnsrv.defaults.${name}
    ) defaultsOptions;
  };
}
