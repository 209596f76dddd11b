# virtualisation.oci-sidecars.tsnsrv: a container of virtualisation.oci-containers as its
# own tailnet machine. For each `containers.<c>`, a sidecar container from the tsnsrv OCI
# image (./oci-image.nix) runs in the network namespace of `forContainer`
# (--network=container:<app>), so upstreams on the app's 127.0.0.1 work.
#
# In the sidecar, tsnsrv spawns its own tailscaled under the loopback guard (seccomp user
# notification): inside a container that matters more, as the app listens on the same
# loopback. It runs as an unprivileged user of the image, with its state on a volume
# (/var/lib/<unit>, mounted at /state) and the auth key, handed over by LoadCredential=,
# copied for that user into the unit's RuntimeDirectory.
{
  config,
  lib,
  pkgs,
  ...
}:
let
  cfg = config.virtualisation.oci-sidecars.tsnsrv;
  defaults = config.services.tsnsrv.defaults;
  backend = config.virtualisation.oci-containers.backend;
  render = import ./render.nix;
  goTsnsrvOnly = import ./go-tsnsrv-only.nix { inherit lib; };

  inherit (lib)
    literalExpression
    mapAttrs'
    mapAttrsToList
    mkEnableOption
    mkIf
    mkOption
    nameValuePair
    types
    ;

  # The account the image runs tsnsrv and its tailscaled as.
  uid = 65532;
  credentialsDir = "/run/tsnsrv-credentials";

  # The unit oci-containers makes of a container (its serviceName, where nixpkgs has that
  # option).
  unitOf =
    name: config.virtualisation.oci-containers.containers.${name}.serviceName or "${backend}-${name}";

  machineName = name: sidecar: if sidecar.name != null then sidecar.name else name;

  # The sidecar's own service.authKeyPath wins; else the sidecars' common one.
  keyOf = sidecar: if sidecar.service.authKeyPath != null then sidecar.service.authKeyPath else cfg.authKeyPath;

  configFileOf =
    name: sidecar:
    (pkgs.formats.json { }).generate "tsnsrv-sidecar-${name}.json" (
      render.sidecarConfig {
        name = machineName name sidecar;
        service = sidecar.service // {
          authKeyPath = keyOf sidecar;
        };
        inherit credentialsDir;
      }
    );

  sidecarModule =
    { name, config, ... }:
    {
      options = {
        name = mkOption {
          type = types.nullOr types.str;
          default = null;
          description = "Machine name on the tailnet. Default: the sidecar container's name.";
        };
        forContainer = mkOption {
          type = types.str;
          example = "calibre-web";
          description = "The container of {option}`virtualisation.oci-containers.containers` to put on the tailnet; the sidecar shares its network.";
        };
        service = mkOption {
          type = types.submodule {
            options =
              import ./options.nix {
                inherit lib defaults;
                unit = name;
                defaultPackage = pkgs.callPackage ./package.nix { };
                defaultTailscale = pkgs.tailscale;
              }
              // goTsnsrvOnly.options;
          };
          default = { };
          example = literalExpression ''{ toURL = "http://127.0.0.1:8083"; }'';
          description = "The sidecar's tsnsrv service: the options of {option}`services.tsnsrv.services.<name>`, starting from {option}`services.tsnsrv.defaults`. Its upstream is on the container's loopback.";
        };
      };
      config.service.name = lib.mkDefault (machineName name config);
    };

  assertionsFor =
    name: sidecar:
    let
      where = "virtualisation.oci-sidecars.tsnsrv.containers.${name}";
    in
    goTsnsrvOnly.assertions "${where}.service" sidecar.service
    ++ [
      {
        assertion = config.virtualisation.oci-containers.containers ? ${sidecar.forContainer};
        message = ''${where}: forContainer = "${sidecar.forContainer}" is not a container of virtualisation.oci-containers.containers.'';
      }
      {
        assertion = sidecar.service.toURL != null || sidecar.service.urlParts != null;
        message = "${where}: set service.toURL (e.g. \"http://127.0.0.1:8080\", the app on the container's loopback) or service.urlParts.port.";
      }
      {
        assertion = sidecar.service.acmeHost == null;
        message = "${where}: acmeHost is for services.tsnsrv.services; a sidecar serves the node's certificate, or certificateFile and certificateKey inside the container.";
      }
      {
        assertion =
          sidecar.service.assertionJwksFile == null || lib.hasPrefix "/state/" sidecar.service.assertionJwksFile;
        message = ''${where}: service.assertionJwksFile = "${toString sidecar.service.assertionJwksFile}" is a path inside the sidecar, which writes only to its volume /state; leave it null (/state/jwks.json, on the host /var/lib/${unitOf name}/jwks.json) or put it under /state/. The app in the container next to it can read the keys from http://127.0.0.1:PORT/jwks.json with service.metricsAddr = "127.0.0.1:PORT".'';
      }
    ];
in
{
  options.virtualisation.oci-sidecars.tsnsrv = {
    enable = mkEnableOption "tsnsrv sidecars, which put containers of virtualisation.oci-containers on a Tailscale tailnet, each as its own machine";

    authKeyPath = mkOption {
      type = types.nullOr types.externalPath;
      default = defaults.authKeyPath;
      defaultText = literalExpression "config.services.tsnsrv.defaults.authKeyPath";
      description = "File holding the auth key (or OAuth client secret) the sidecars log in with, unless a sidecar's own `service.authKeyPath` names another; handed over by LoadCredential=, so it may be readable by root only.";
    };

    image = mkOption {
      type = types.package;
      default = pkgs.callPackage ./oci-image.nix {
        tsnsrv = defaults.package;
        tailscale = defaults.tailscalePackage;
      };
      defaultText = literalExpression "the image of ./oci-image.nix with services.tsnsrv.defaults' package and tailscalePackage";
      description = "The OCI image the sidecars run (loaded with the backend's `load` before each start).";
    };

    containers = mkOption {
      type = types.attrsOf (types.submodule sidecarModule);
      default = { };
      example = literalExpression ''
        {
          books-tailnet = {
            forContainer = "calibre-web";
            service.toURL = "http://127.0.0.1:8083";
          };
        }
      '';
      description = "The sidecar containers, by name. Each becomes `virtualisation.oci-containers.containers.<name>`.";
    };
  };

  config = mkIf cfg.enable {
    assertions = lib.concatLists (mapAttrsToList assertionsFor cfg.containers);

    virtualisation.oci-containers.containers = mapAttrs' (
      name: sidecar:
      nameValuePair name {
        image = "${cfg.image.imageName}:${cfg.image.imageTag}";
        imageFile = cfg.image;
        dependsOn = [ sidecar.forContainer ];
        user = "${toString uid}:${toString uid}";
        cmd = [
          "--config"
          "/etc/tsnsrv.json"
        ];
        volumes = [
          "/var/lib/${unitOf name}:/state"
          "/run/${unitOf name}:${credentialsDir}:ro"
          "${configFileOf name sidecar}:/etc/tsnsrv.json:ro"
        ];
        extraOptions = [
          "--network=container:${sidecar.forContainer}"
          # Hardened as far as the guard allows: tsnsrv needs no capabilities (it sets
          # no_new_privs itself before installing tailscaled's seccomp filter), and writes
          # only to /state and the tmpfs a read-only container gets on /tmp.
          "--cap-drop=all"
          "--security-opt=no-new-privileges"
          "--read-only"
        ];
      }
    ) cfg.containers;

    systemd.services = lib.mkMerge [
      (mapAttrs' (
        name: sidecar:
        nameValuePair (unitOf name) {
          serviceConfig = {
            # A list, so that it adds to what oci-containers sets for podman (a runtime
            # directory named after the container) instead of clashing with it.
            RuntimeDirectory = [ (unitOf name) ];
            RuntimeDirectoryMode = "0700";
            LoadCredential = lib.optional (keyOf sidecar != null) "authKey:${keyOf sidecar}";
            # For the image's unprivileged account: its state, and its copy of the key. The
            # state directory is made here, not with StateDirectory=: the unit runs as root,
            # and systemd would give a StateDirectory back to root, recursively, on each start.
            ExecStartPre = lib.mkBefore (
              [
                "${pkgs.coreutils}/bin/install -d -m 0700 -o ${toString uid} -g ${toString uid} /var/lib/${unitOf name}"
                "${pkgs.coreutils}/bin/chown ${toString uid}:${toString uid} /run/${unitOf name}"
              ]
              ++ lib.optional (
                keyOf sidecar != null
              ) "${pkgs.coreutils}/bin/install -o ${toString uid} -g ${toString uid} -m 0400 \${CREDENTIALS_DIRECTORY}/authKey /run/${unitOf name}/authKey"
            );
          };
        }
      ) cfg.containers)
      # The app's unit keeps its sidecar up, as the Go tsnsrv's module does.
      (lib.mkMerge (
        mapAttrsToList (name: sidecar: {
          ${unitOf sidecar.forContainer}.unitConfig.Upholds = [ "${unitOf name}.service" ];
        }) cfg.containers
      ))
    ];
  };
}
