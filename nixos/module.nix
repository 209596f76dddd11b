# services.tsnsrv: each local web service on the tailnet as its own machine.
#
# Per service `<name>` this runs two units (docs/security.md):
#
#   tsnsrv-<name>-tailscaled.service  the service's own userspace tailscaled. A userspace
#                                     tailscaled forwards every tailnet port that Serve does
#                                     not claim to 127.0.0.1:<port>, so this unit may reach
#                                     no loopback address but the proxy's front address
#                                     (IPAddressDeny=localhost, IPAddressAllow=frontAddress).
#   tsnsrv-<name>.service             the proxy, attached to that daemon's LocalAPI socket
#                                     and configured by one JSON file rendered by
#                                     ./render.nix. It reaches the upstreams freely.
#
# Both run as the same dynamic user: the proxy accepts front connections only from
# sockets owned by tailscaled's uid, and the LocalAPI grants full access to that uid.
{
  config,
  lib,
  pkgs,
  utils,
  ...
}:
let
  cfg = config.services.tsnsrv;
  render = import ./render.nix;

  inherit (lib)
    concatLists
    concatMap
    filterAttrs
    getExe
    getExe'
    literalExpression
    mapAttrsToList
    mkEnableOption
    mkIf
    mkOption
    nameValuePair
    optional
    optionals
    types
    ;

  serviceOptions =
    args:
    import ./options.nix (
      {
        inherit lib;
        # Built with the system's own nixpkgs, whichever the flake's input follows.
        defaultPackage = pkgs.callPackage ./package.nix { };
        defaultTailscale = pkgs.tailscale;
      }
      // args
    );

  goTsnsrvOnly = import ./go-tsnsrv-only.nix { inherit lib; };

  serviceModule =
    { name, ... }:
    {
      options =
        serviceOptions {
          inherit (cfg) defaults;
          unit = name;
        }
        // goTsnsrvOnly.options;
    };

  unitOf = unit: "tsnsrv-${unit}";
  # May add files to render.jwksDir, where the services publish their assertion keys.
  jwksGroup = "tsnsrv-jwks";
  daemonUnitOf = unit: "tsnsrv-${unit}-tailscaled";

  acmeCert = service: config.security.acme.certs.${service.acmeHost};

  # The effective configuration of a service, as the runtime will see it.
  settingsOf =
    unit: service:
    render.serviceConfig {
      inherit unit service;
      acmeDirectory = if service.acmeHost != null then (acmeCert service).directory else null;
    };

  # The rendered file is checked by the runtime's own validator at build time when the
  # build machine can run the package, so a bad value fails `nixos-rebuild build` with
  # the runtime's message instead of a restart loop after `switch`.
  configFileOf =
    unit: service:
    let
      raw = (pkgs.formats.json { }).generate "tsnsrv-${unit}.json" (settingsOf unit service);
    in
    if pkgs.stdenv.buildPlatform.canExecute pkgs.stdenv.hostPlatform then
      pkgs.runCommand "tsnsrv-${unit}-checked.json"
        {
          inherit raw;
          nativeBuildInputs = [ service.package ];
        }
        ''
          tsnsrv check --config "$raw" > /dev/null
          cp "$raw" "$out"
        ''
    else
      raw;

  isLoopbackURL =
    url: builtins.match "[a-z]+://(localhost|127\\.[0-9.]+|\\[::1])([:/].*)?" url != null;

  # The Go tsnsrv's hardening, plus a syscall filter, address families and /proc
  # restrictions. ProtectProc=invisible (not "noaccess") because the proxy inspects
  # /proc/<tailscaled>/fd to tell tailscaled's sockets from other local processes';
  # both units run as the same user, so that process stays visible. For the same reason
  # no PrivateUsers=: each unit would get a user namespace of its own, and from the
  # proxy's, tailscaled's /proc entry is hidden.
  hardening = {
    DynamicUser = true;
    AmbientCapabilities = "";
    CapabilityBoundingSet = "";
    DeviceAllow = "";
    LockPersonality = true;
    MemoryDenyWriteExecute = true;
    NoNewPrivileges = true;
    PrivateDevices = true;
    PrivateMounts = true;
    PrivateTmp = true;
    PrivateUsers = false;
    ProtectClock = true;
    ProtectControlGroups = true;
    ProtectHome = true;
    ProtectHostname = true;
    ProtectKernelLogs = true;
    ProtectKernelModules = true;
    ProtectKernelTunables = true;
    ProtectProc = "invisible";
    ProtectSystem = "strict";
    RemoveIPC = true;
    # AF_NETLINK: tailscaled watches routes; the proxy asks NETLINK_SOCK_DIAG who owns
    # each front connection.
    RestrictAddressFamilies = [
      "AF_UNIX"
      "AF_INET"
      "AF_INET6"
      "AF_NETLINK"
    ];
    RestrictNamespaces = true;
    RestrictRealtime = true;
    RestrictSUIDSGID = true;
    SystemCallArchitectures = "native";
    SystemCallFilter = [
      "@system-service"
      "~@privileged"
    ];
    UMask = "0077";
  };

  # Both units share the user, so they share the runtime directory; neither may remove
  # it from under the other when it stops.
  sharedDirectories = unit: {
    User = unitOf unit;
    Group = unitOf unit;
    RuntimeDirectory = unitOf unit;
    RuntimeDirectoryMode = "0700";
    RuntimeDirectoryPreserve = true;
  };

  daemonUnit =
    unit: service:
    let
      paths = render.paths unit;
    in
    {
      description = "tailscaled of tsnsrv service ${service.name}";
      after = [ "network-online.target" ];
      wants = [ "network-online.target" ];
      # Restarting the proxy (a changed config) must not drop the node.
      stopIfChanged = false;
      environment = {
        # Per instance, or all instances share one log identity.
        TS_LOGS_DIR = paths.stateDir;
      };
      serviceConfig =
        hardening
        // sharedDirectories unit
        // {
          Type = "notify";
          ExecStart = utils.escapeSystemdExecArgs (
            [
              (getExe' service.tailscalePackage "tailscaled")
              "--tun=userspace-networking"
              "--statedir=${paths.stateDir}"
              "--socket=${paths.tailscaledSocket}"
              "--port=0"
            ]
            ++ optional (!service.tailscaledLogUpload) "--no-logs-no-support"
            ++ optional service.tailscaledVerbose "--verbose=1"
          );
          Restart = "always";
          RestartSec = "5s";
          StateDirectory = unitOf unit;
          StateDirectoryMode = "0700";
          # Peers must not reach host loopback through the node (docs/security.md).
          IPAddressDeny = "localhost";
          IPAddressAllow = [
            service.frontAddress
          ]
          # The resolver stub, where Go's resolver finds it in /etc/resolv.conf.
          ++ optionals config.services.resolved.enable [
            "127.0.0.53"
            "127.0.0.54"
          ];
        };
    };

  # Services whose JWKS goes to the module's default directory, render.jwksDir.
  defaultJwksServices = filterAttrs (
    unit: service: service.assertions && service.assertionJwksFile == null
  ) cfg.services;

  # Identity assertions: the signing keys in a state directory of the proxy unit alone
  # (the daemon unit, the same dynamic user, never has it in its namespace), and the
  # JWKS written where upstreams read it.
  assertionSettings =
    unit: service:
    let
      paths = render.paths unit;
      jwksFile = render.jwksFileOf unit service;
    in
    lib.optionalAttrs service.assertions {
      StateDirectory = paths.assertionKeyDirectory;
      StateDirectoryMode = "0700";
      # "-": a missing directory is for tsnsrv to name (assertionJwksFile), not a
      # namespace failure of the unit.
      ReadWritePaths = [ "-${dirOf jwksFile}" ];
    };

  proxyUnit =
    unit: service:
    let
      acmeUnits = optional (service.acmeHost != null) "acme-${service.acmeHost}.service";
    in
    {
      description = "tsnsrv: ${service.name} on the tailnet";
      wantedBy = [ "multi-user.target" ];
      requires = [ "${daemonUnitOf unit}.service" ];
      after = [ "${daemonUnitOf unit}.service" ] ++ acmeUnits;
      # The Go module forgets this: without it the proxy can start before the first
      # certificate exists.
      wants = acmeUnits;
      stopIfChanged = false;
      serviceConfig =
        hardening
        // sharedDirectories unit
        // assertionSettings unit service
        // {
          # READY=1 comes only once the node is up, the Serve config is set and the
          # front listener accepts; STOPPING=1 and the watchdog too.
          Type = "notify";
          NotifyAccess = "main";
          WatchdogSec = "60s";
          ExecStart = utils.escapeSystemdExecArgs (
            [
              (getExe service.package)
              "--config"
              "${configFileOf unit service}"
            ]
            ++ service.extraArgs
          );
          # SIGHUP re-reads the certificate files (ACME renewals).
          ExecReload = "${pkgs.coreutils}/bin/kill -HUP $MAINPID";
          # The proxy removes its Serve config when it stops; if it crashed, do it here, or
          # the daemon would keep forwarding tailnet clients to a front port that any local
          # user could bind while the proxy is down.
          ExecStopPost = "-${
            utils.escapeSystemdExecArgs [
              (getExe' service.tailscalePackage "tailscale")
              "--socket=${(render.paths unit).tailscaledSocket}"
              "serve"
              "reset"
            ]
          }";
          Restart = "always";
          RestartSec = "5s";
          SupplementaryGroups =
            service.supplementalGroups
            ++ optional (service.acmeHost != null) (acmeCert service).group
            ++ optional (defaultJwksServices ? ${unit}) jwksGroup;
          LoadCredential = optional (service.authKeyPath != null) "authKey:${service.authKeyPath}";
        };
    };

  assertionsFor =
    unit: service:
    let
      where = "services.tsnsrv.services.${unit}";
      certFile = if service.acmeHost != null then "acme" else service.certificateFile;
      certKey = if service.acmeHost != null then "acme" else service.certificateKey;
    in
    goTsnsrvOnly.assertions where service
    ++ [
      {
        assertion = service.toURL != null || service.urlParts != null;
        message = ''${where}: set toURL (e.g. "http://127.0.0.1:8083") or urlParts.port (with urlParts.host and urlParts.protocol, which default to 127.0.0.1 and http), so tsnsrv knows where to proxy to.'';
      }
      {
        assertion = !(service.funnel && service.plaintext);
        message = "${where}: Funnel only carries TLS; set funnel = false or plaintext = false.";
      }
      {
        assertion = !service.funnelOnly || service.funnel;
        message = "${where}: funnelOnly = true needs funnel = true as well.";
      }
      {
        assertion = (certFile == null) == (certKey == null);
        message = "${where}: certificateFile and certificateKey must be set together (or use acmeHost, which sets both).";
      }
      {
        assertion =
          service.acmeHost == null || (service.certificateFile == null && service.certificateKey == null);
        message = "${where}: acmeHost sets certificateFile and certificateKey; do not set them as well.";
      }
      {
        # The trimmed tailscale (./tailscale-trimmed.nix) says what it left out.
        assertion =
          !service.tailscaledLogUpload || !lib.elem "logtail" (service.tailscalePackage.omittedFeatures or [ ]);
        message = "${where}: tailscaledLogUpload = true, but tailscalePackage is built without log upload (the trimmed tailscale); use pkgs.tailscale for this service.";
      }
      {
        assertion = lib.versionAtLeast (lib.getVersion service.tailscalePackage) "1.92";
        message = "${where}: tailscalePackage is tailscale ${lib.getVersion service.tailscalePackage}, but tsnsrv needs 1.92 or newer (Serve's PROXY protocol forwarding); use a newer pkgs.tailscale.";
      }
      {
        assertion =
          builtins.match "127\\.[0-9]+\\.[0-9]+\\.[0-9]+" service.frontAddress != null
          && service.frontAddress != "127.0.0.1";
        message = ''${where}: frontAddress = "${service.frontAddress}" must be an IPv4 loopback address other than 127.0.0.1 (where tailscaled forwards unclaimed tailnet ports), e.g. "127.0.0.2".'';
      }
      {
        assertion = builtins.match "[a-z0-9][a-z0-9-]{0,23}" unit != null;
        message = "${where}: the attribute name names the units and the dynamic user tsnsrv-${unit}, so it must be 1-24 lowercase letters, digits and \"-\"; use a shorter attribute name and set its `name` option to the machine name you want.";
      }
      {
        assertion = service.loginServerUrl == null || !(isLoopbackURL service.loginServerUrl);
        message = ''${where}: loginServerUrl = "${toString service.loginServerUrl}" is on host loopback, which this service's tailscaled may not reach (it is confined so that tailnet peers cannot reach host loopback through it); use an address of the control server outside 127.0.0.0/8.'';
      }
    ];

  # "web-tailscaled"'s proxy unit would be "web"'s daemon unit.
  unitClashes = builtins.filter (unit: cfg.services ? "${unit}-tailscaled") (builtins.attrNames cfg.services);

  duplicateNames =
    let
      names = mapAttrsToList (_: service: service.name) cfg.services;
    in
    lib.unique (builtins.filter (name: lib.count (n: n == name) names > 1) names);
in
{
  imports = [ ./oci-sidecars.nix ];

  options.services.tsnsrv = {
    enable = mkEnableOption "tsnsrv, which puts local web services on a Tailscale tailnet, each as its own machine";

    defaults = mkOption {
      type = types.submodule { options = serviceOptions { defaults = null; } // goTsnsrvOnly.options; };
      default = { };
      example = literalExpression ''
        {
          authKeyPath = "/run/secrets/tailscale-authkey";
          loginServerUrl = "https://headscale.example.com";
        }
      '';
      description = ''
        Options every service in {option}`services.tsnsrv.services` starts from. A
        service's own value replaces the default (lists are not merged).
      '';
    };

    services = mkOption {
      type = types.attrsOf (types.submodule serviceModule);
      default = { };
      example = literalExpression ''
        {
          books = { toURL = "http://127.0.0.1:8083"; funnel = true; };
          home.urlParts.port = 8123;
        }
      '';
      description = ''
        The services to put on the tailnet. Each attribute name becomes a machine
        (unless its `name` says otherwise) and the units `tsnsrv-<name>.service` and
        `tsnsrv-<name>-tailscaled.service`.
      '';
    };
  };

  config = mkIf cfg.enable {
    assertions =
      concatLists (mapAttrsToList assertionsFor cfg.services)
      ++ goTsnsrvOnly.assertions "services.tsnsrv.defaults" cfg.defaults
      ++ [
        {
          assertion = unitClashes == [ ];
          message = lib.concatMapStringsSep "\n" (
            unit:
            "services.tsnsrv.services.${unit}-tailscaled: its proxy unit would be ${daemonUnitOf unit}.service, which is already the tailscaled unit of services.tsnsrv.services.${unit}; use another attribute name (and set `name` to the machine name you want)."
          ) unitClashes;
        }
        {
          assertion = duplicateNames == [ ];
          message = "services.tsnsrv.services: machine name(s) ${lib.concatStringsSep ", " duplicateNames} used by more than one service; two nodes cannot share a name (the second would become <name>-1). Give each service its own `name`.";
        }
      ];

    # ACME renewals reach the proxy as a reload (SIGHUP re-reads the files). This also
    # declares the certificate if the configuration does not, and the ACME module then
    # asks for how to validate it.
    security.acme.certs = lib.mkMerge (
      mapAttrsToList (unit: service: {
        ${service.acmeHost}.reloadServices = [ "${unitOf unit}.service" ];
      }) (filterAttrs (_: service: service.acmeHost != null) cfg.services)
    );

    # Everyone may read the public keys; the services' group may add files, but the
    # sticky bit keeps each file its writer's alone to replace.
    users.groups = lib.mkIf (defaultJwksServices != { }) { ${jwksGroup} = { }; };
    systemd.tmpfiles.rules = lib.mkIf (defaultJwksServices != { }) [
      "d ${render.jwksDir} 1775 root ${jwksGroup} - -"
    ];

    systemd.services = lib.listToAttrs (
      concatMap (unit: [
        (nameValuePair (unitOf unit) (proxyUnit unit cfg.services.${unit}))
        (nameValuePair (daemonUnitOf unit) (daemonUnit unit cfg.services.${unit}))
      ]) (builtins.attrNames cfg.services)
    );
  };

  meta.maintainers = [ ];
}
