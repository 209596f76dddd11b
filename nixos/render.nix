# The JSON configuration of one tsnsrv service, computed from its NixOS option values.
#
# This file uses builtins only (no nixpkgs `lib`), so that the checks in tests/nix can
# evaluate it with a bare `nix-instantiate --eval --strict --json` and hand the result to
# `tsnsrv check --config`: the option tree and the Python config model are tested
# against each other without a nixpkgs checkout. The NixOS module (./module.nix) uses
# the same functions, so what the tests render is what the units run.
let
  inherit (builtins)
    attrNames
    filter
    hasAttr
    listToAttrs
    removeAttrs
    ;

  # The JSON keys of the runtime (python/tsnsrv/config.py) that come straight from a
  # service option of the same name. tests/nix checks this list against the runtime's
  # fields and against the module's options, in both directions.
  optionKeys = [
    "name"
    "toURL"
    "loginServerUrl"
    "authKeyPath"
    "tags"
    "ephemeral"
    "timeout"
    "tailscaledVerbose"
    "tailscaledLogUpload"
    "listenPort"
    "plaintext"
    "certificateFile"
    "certificateKey"
    "funnel"
    "funnelOnly"
    "readHeaderTimeout"
    "funnelReadHeaderTimeout"
    "frontAddress"
    "prefixes"
    "denyPrefixes"
    "stripPrefix"
    "accessRules"
    "suppressWhois"
    "whoisTimeout"
    "identityHeaders"
    "appCapabilities"
    "recommendedProxyHeaders"
    "upstreamHeaders"
    "assertions"
    "assertionAudience"
    "assertionLifetime"
    "assertionBindRequest"
    "assertionKeyRotation"
    "assertionJwksFile"
    "upstreamUnixAddr"
    "upstreamTCPAddr"
    "insecureHTTPS"
    "upstreamCaFile"
    "upstreamAllowInsecureCiphers"
    "upstreamConnectTimeout"
    "upstreamRetryWindow"
    "upstreamResponseHeaderTimeout"
    "upstreamIdleTimeout"
    "metricsAddr"
    "logLevel"
    "accessLog"
    "shutdownTimeout"
  ];

  # JSON keys the module decides itself, because they describe the unit layout rather
  # than the service: tailscaled runs in its own unit (docs/security.md), so the proxy
  # attaches to its socket instead of spawning a daemon.
  managedKeys = [
    "stateDir"
    "tailscaledSocket"
    "tailscaledPath"
    "tailscaledUser"
    "controlSocket"
    "allowUnconfinedTailscaled" # the daemon unit is confined by systemd instead
    "assertionKeyDir" # the proxy unit's own state directory, out of the daemon unit's reach
  ];

  # Service options that shape the units or are resolved into other keys, and so
  # never appear in the JSON file under their own name.
  moduleOnlyOptions = [
    "package"
    "tailscalePackage"
    "acmeHost"
    "urlParts"
    "supplementalGroups"
    "extraArgs"
  ];

  # Where a service keeps its state and sockets. The module names its units, state
  # and runtime directories after the attribute name `unit`; these paths are what
  # systemd's StateDirectory=, RuntimeDirectory= and LoadCredential= produce.
  paths = unit: rec {
    unitName = "tsnsrv-${unit}";
    stateDir = "/var/lib/${unitName}";
    runtimeDir = "/run/${unitName}";
    tailscaledSocket = "${runtimeDir}/tailscaled.sock";
    controlSocket = "${runtimeDir}/control.sock";
    credentialsDir = "/run/credentials/${unitName}.service";
    # The proxy unit's own StateDirectory=: the assertion signing keys, which the daemon
    # unit never has in its namespace.
    assertionKeyDirectory = "tsnsrv-keys.d/${unit}";
    assertionKeyDir = "/var/lib/${assertionKeyDirectory}";
    defaultJwksFile = "${jwksDir}/${unit}.json";
  };

  # Where the services publish their assertion keys by default. The ".d" keeps this and
  # tsnsrv-keys.d apart from every unit's tsnsrv-<name> directories: attribute names
  # have no dots.
  jwksDir = "/run/tsnsrv-jwks.d";

  # The JWKS file a service writes: its option, else the module's default when
  # assertions are on.
  jwksFileOf =
    unit: service:
    if (service.assertionJwksFile or null) != null then
      service.assertionJwksFile
    else if service.assertions or false then
      (paths unit).defaultJwksFile
    else
      null;

  # toURL, else the URL put together from urlParts (null when neither is set; the
  # module asserts against that).
  upstreamURL =
    service:
    let
      parts = service.urlParts or null;
    in
    if (service.toURL or null) != null then
      service.toURL
    else if parts != null then
      "${parts.protocol or "http"}://${parts.host or "127.0.0.1"}:${toString parts.port}"
    else
      null;

  # An access rule is either the runtime's one-line form ("allow /admin user:me") or an
  # object; objects keep only the fields the runtime knows (a submodule value carries
  # nothing else, but a hand-written attrset in the tests might).
  ruleFields = [
    "action"
    "prefix"
    "users"
    "domains"
    "nodes"
    "tags"
    "capabilities"
  ];
  renderRule =
    rule:
    if builtins.isString rule then
      rule
    else
      listToAttrs (
        map (field: {
          name = field;
          value = rule.${field};
        }) (filter (field: hasAttr field rule && rule.${field} != null) ruleFields)
      );

  dropNulls =
    attrs: removeAttrs attrs (filter (key: attrs.${key} == null) (attrNames attrs));

  # What both layouts render from a service's options.
  settingsOf =
    service: managed:
    dropNulls (
      listToAttrs (
        map (key: {
          name = key;
          value = service.${key};
        }) (filter (key: hasAttr key service) optionKeys)
      )
      // {
        toURL = upstreamURL service;
        accessRules = map renderRule (service.accessRules or [ ]);
      }
      // managed
    );

  /**
    The configuration file content (an attrset, for builtins.toJSON) of one service.

    - `unit`: the attribute name under services.tsnsrv.services (names the units).
    - `service`: its option values. Options left out of the attrset are left out of
      the file, so the runtime's defaults apply.
    - `acmeDirectory`: security.acme.certs.<acmeHost>.directory when acmeHost is set.

    Options that are null are left out: null means "the runtime's default".
  */
  serviceConfig =
    {
      unit,
      service,
      acmeDirectory ? null,
    }:
    let
      p = paths unit;
      tailscalePackage = service.tailscalePackage or null;
    in
    settingsOf service (
      {
        name = service.name or unit;
        # The key file itself is handed over with LoadCredential=, so the dynamic
        # user never needs to read the (root-only) original.
        authKeyPath = if (service.authKeyPath or null) != null then "${p.credentialsDir}/authKey" else null;
        stateDir = p.stateDir;
        tailscaledSocket = p.tailscaledSocket;
        controlSocket = p.controlSocket;
        # Informational in attach mode (the proxy never spawns it), but `tsnsrv check`
        # and `tsnsrv status` then name the daemon that actually runs.
        tailscaledPath = if tailscalePackage != null then "${tailscalePackage}/bin/tailscaled" else null;
        tailscaledUser = null;
        assertionKeyDir = p.assertionKeyDir;
        assertionJwksFile = jwksFileOf unit service;
      }
      // (
        if acmeDirectory != null then
          {
            certificateFile = "${acmeDirectory}/fullchain.pem";
            certificateKey = "${acmeDirectory}/key.pem";
          }
        else
          { }
      )
    );

  /**
    The configuration of an OCI sidecar (virtualisation.oci-sidecars.tsnsrv): tsnsrv
    spawns its own tailscaled inside the container, under the loopback guard, with the
    state (and the control socket) on the volume mounted at /state.

    - `name`: the machine name; `service`: its option values; `credentialsDir`: where
      the container unit's LoadCredential= puts the key, mounted at the same path.
  */
  sidecarConfig =
    {
      name,
      service,
      credentialsDir,
    }:
    settingsOf service {
      inherit name;
      authKeyPath = if (service.authKeyPath or null) != null then "${credentialsDir}/authKey" else null;
      stateDir = "/state";
      controlSocket = "/state/control.sock";
      tailscaledSocket = null;
      tailscaledPath = "tailscaled";
      tailscaledUser = null;
      # The assertion signing keys stay in the default /state/assertion-keys; the JWKS
      # goes beside them, on the host in /var/lib/podman-<sidecar>.
      assertionJwksFile =
        if (service.assertionJwksFile or null) == null && (service.assertions or false) then
          "/state/jwks.json"
        else
          service.assertionJwksFile or null;
    };
in
{
  inherit
    optionKeys
    managedKeys
    moduleOnlyOptions
    paths
    jwksDir
    jwksFileOf
    upstreamURL
    serviceConfig
    sidecarConfig
    ;
}
