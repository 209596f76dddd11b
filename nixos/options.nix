# The options of one tsnsrv service, declared twice by ./module.nix: once under
# services.tsnsrv.defaults (with the runtime's defaults) and once per service under
# services.tsnsrv.services.<name> (defaulting to services.tsnsrv.defaults.*).
#
# Every option except those in render.nix's `moduleOnlyOptions` is a key of the
# runtime's JSON configuration (python/tsnsrv/config.py) with the same name, type and
# default; tests/nix checks that in both directions.
{
  lib,
  # The evaluated services.tsnsrv.defaults, or null when declaring the defaults.
  defaults,
  # The attribute name of the service (null when declaring the defaults).
  unit ? null,
  # Default packages, passed in so that this file does not depend on `pkgs`.
  defaultPackage,
  defaultTailscale,
}:
let
  inherit (lib) mkOption types literalExpression;

  forService = defaults != null;

  # A service option defaults to the value under services.tsnsrv.defaults; only the
  # defaults themselves carry the runtime's default. `defaultText` is documentation
  # only and never changes the value.
  inheritable =
    name: args:
    mkOption (
      args
      // (
        if forService then
          {
            default = defaults.${name};
            defaultText = literalExpression "config.services.tsnsrv.defaults.${name}";
          }
        else
          { }
      )
    );

  # Seconds, or a Go duration string as the Go tsnsrv took them ("1m30s", "500ms").
  duration = types.either types.numbers.nonnegative (
    types.strMatching "0|(([0-9]+(\\.[0-9]*)?|\\.[0-9]+)(ns|us|µs|ms|s|m|h))+"
  );

  # Secrets and sockets are named by path, never copied: a Nix path literal would put a
  # key into the world-readable store, so only absolute path strings outside it pass.
  hostPath = types.externalPath;

  prefix = types.strMatching "(tailnet:|funnel:)?/.*";
  tag = types.strMatching "tag:[A-Za-z0-9][A-Za-z0-9-]*";

  accessRuleModule = {
    options = {
      action = mkOption {
        type = types.enum [
          "allow"
          "deny"
        ];
        description = "Whether matching requests are allowed or refused (403).";
      };
      prefix = mkOption {
        type = prefix;
        default = "/";
        description = ''Path prefix the rule applies to; "tailnet:" or "funnel:" restricts it to one kind of client.'';
      };
      users = mkOption {
        type = types.listOf types.str;
        default = [ ];
        example = [ "alice@example.com" ];
        description = "Login names the rule matches.";
      };
      domains = mkOption {
        type = types.listOf types.str;
        default = [ ];
        example = [ "example.com" ];
        description = "Login name domains the rule matches.";
      };
      nodes = mkOption {
        type = types.listOf types.str;
        default = [ ];
        example = [ "alices-laptop" ];
        description = "Machine names of the connecting node the rule matches.";
      };
      tags = mkOption {
        type = types.listOf tag;
        default = [ ];
        example = [ "tag:family" ];
        description = "ACL tags of the connecting node the rule matches.";
      };
      capabilities = mkOption {
        type = types.listOf types.str;
        default = [ ];
        example = [ "example.com/cap/admin" ];
        description = "Peer capabilities (granted in the tailnet policy) the rule matches.";
      };
    };
  };

  urlPartsModule =
    let
      inherited = if forService then defaults.urlParts else null;
      inheritedText =
        part: fallback:
        if forService then
          {
            defaultText = literalExpression ''config.services.tsnsrv.defaults.urlParts.${part} or "${fallback}"'';
          }
        else
          { };
    in
    {
      options = {
        protocol = mkOption (
          {
            type = types.enum [
              "http"
              "https"
            ];
            default = if inherited != null then inherited.protocol else "http";
            description = "Scheme used to reach the upstream.";
          }
          // inheritedText "protocol" "http"
        );
        host = mkOption (
          {
            type = types.str;
            default = if inherited != null then inherited.host else "127.0.0.1";
            description = "Host (name or address) of the upstream.";
          }
          // inheritedText "host" "127.0.0.1"
        );
        port = mkOption (
          {
            type = types.port;
            description = "TCP port of the upstream.";
          }
          // (
            if inherited != null then
              {
                default = inherited.port;
                defaultText = literalExpression "config.services.tsnsrv.defaults.urlParts.port";
              }
            else
              { }
          )
        );
      };
    };
in
(
  if forService then
    {
      name = mkOption {
        type = types.strMatching "[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?";
        default = unit;
        defaultText = literalExpression "<name>";
        example = "books";
        description = ''
          Machine name of the service on the tailnet (its MagicDNS name). Units and
          directories are named after the attribute name, so this can differ from it.
        '';
      };

      toURL = mkOption {
        type = types.nullOr (types.strMatching "https?://.+");
        default = null;
        example = "http://127.0.0.1:8083";
        description = ''
          Upstream URL to proxy to (may carry a base path). When null, it is put
          together from {option}`urlParts`; one of the two must be set.
        '';
      };
    }
  else
    { }
)
// {
  package = inheritable "package" {
    type = types.package;
    default = defaultPackage;
    defaultText = literalExpression ''pkgs.callPackage "''${tsnsrv}/nixos/package.nix" { }'';
    description = "The tsnsrv package to run.";
  };

  tailscalePackage = inheritable "tailscalePackage" {
    type = types.package;
    default = defaultTailscale;
    defaultText = literalExpression "pkgs.tailscale";
    description = ''
      The tailscale package whose `tailscaled` runs this service's node. It must be
      1.92 or newer: tsnsrv relies on Serve forwarding with the PROXY protocol. The
      flake's `tailscaleTrimmed` is a tailscaled about 30 % lighter, compiled locally
      (docs/trimmed-tailscaled.md).
    '';
  };

  urlParts = inheritable "urlParts" {
    type = types.nullOr (types.submodule urlPartsModule);
    default = null;
    example = literalExpression ''{ port = 8083; }'';
    description = ''
      The upstream URL in parts, used when {option}`toURL` is null. Under
      `services.tsnsrv.defaults` it gives the protocol and host that every service's
      `urlParts` starts from.
    '';
  };

  loginServerUrl = inheritable "loginServerUrl" {
    type = types.nullOr (types.strMatching "https?://.+");
    default = null;
    example = "https://headscale.example.com";
    description = "Control server URL, e.g. a headscale instance. Null means Tailscale's.";
  };

  authKeyPath = inheritable "authKeyPath" {
    type = types.nullOr hostPath;
    default = null;
    example = "/run/secrets/tailscale-authkey";
    description = ''
      File holding an auth key or an OAuth client secret (`tskey-client-...`, which
      needs {option}`tags`). It is handed to the service with systemd's
      `LoadCredential=`, so it can stay readable by root only. Null means no key:
      the node must already be logged in, or it prints a login URL to the journal.
    '';
  };

  tags = inheritable "tags" {
    type = types.listOf tag;
    default = [ ];
    example = [ "tag:books" ];
    description = ''
      ACL tags put on auth keys minted from an OAuth client secret (which requires
      them) and requested at interactive login. An auth key brings its own tags.
    '';
  };

  ephemeral = inheritable "ephemeral" {
    type = types.bool;
    default = false;
    description = "Register an ephemeral node, removed from the tailnet when it stops.";
  };

  timeout = inheritable "timeout" {
    type = duration;
    default = 0;
    example = "5m";
    description = "Give up (and let systemd restart the service) if the node is not up within this time; 0 waits forever.";
  };

  tailscaledVerbose = inheritable "tailscaledVerbose" {
    type = types.bool;
    default = false;
    description = "Run this service's tailscaled with `--verbose=1`.";
  };

  tailscaledLogUpload = inheritable "tailscaledLogUpload" {
    type = types.bool;
    default = false;
    description = ''
      Let this service's tailscaled upload its logs to Tailscale. Off by default
      (`--no-logs-no-support`); Tailscale support may ask for it.
    '';
  };

  listenPort = inheritable "listenPort" {
    type = types.nullOr types.port;
    default = null;
    example = 8443;
    description = "Tailnet port to serve on. Null means 443, or 80 with {option}`plaintext`.";
  };

  plaintext = inheritable "plaintext" {
    type = types.bool;
    default = false;
    description = "Serve plain HTTP instead of HTTPS (e.g. with headscale, which cannot issue certificates).";
  };

  certificateFile = inheritable "certificateFile" {
    type = types.nullOr types.path;
    default = null;
    example = "/var/lib/acme/books.example.com/fullchain.pem";
    description = ''
      TLS certificate (PEM chain) to serve instead of the node's `*.ts.net`
      certificate. Set by {option}`acmeHost`.
    '';
  };

  certificateKey = inheritable "certificateKey" {
    type = types.nullOr hostPath;
    default = null;
    example = "/var/lib/acme/books.example.com/key.pem";
    description = "Private key for {option}`certificateFile`. Set by {option}`acmeHost`.";
  };

  acmeHost = inheritable "acmeHost" {
    type = types.nullOr types.str;
    default = null;
    example = "books.example.com";
    description = ''
      Serve the certificate `security.acme.certs.<acmeHost>` instead of the node's
      own: sets {option}`certificateFile` and {option}`certificateKey`, adds the
      certificate's group to the service, orders it after the certificate's unit and
      reloads the certificate (SIGHUP) when ACME renews it.
    '';
  };

  funnel = inheritable "funnel" {
    type = types.bool;
    default = false;
    description = "Also expose the service to the public internet with Tailscale Funnel (ports 443, 8443 or 10000).";
  };

  funnelOnly = inheritable "funnelOnly" {
    type = types.bool;
    default = false;
    description = "Serve only Funnel (public) traffic and refuse tailnet clients. Needs {option}`funnel`.";
  };

  readHeaderTimeout = inheritable "readHeaderTimeout" {
    type = duration;
    default = 30;
    description = "Time a tailnet client has to send its request headers (slowloris guard); 0 disables.";
  };

  funnelReadHeaderTimeout = inheritable "funnelReadHeaderTimeout" {
    type = duration;
    default = 5;
    description = "Time a Funnel (public) client has to send its request headers.";
  };

  frontAddress = inheritable "frontAddress" {
    type = types.str;
    default = "127.0.0.2";
    example = "127.0.0.3";
    description = ''
      Loopback address of the internal listener that tailscaled forwards to. The
      service's tailscaled may reach only this loopback address
      (`IPAddressAllow=`); it must not be 127.0.0.1, where tailscaled forwards every
      unclaimed tailnet port.
    '';
  };

  prefixes = inheritable "prefixes" {
    type = types.listOf prefix;
    default = [ ];
    example = [
      "tailnet:/"
      "funnel:/kobo/"
    ];
    description = ''
      Allowed path prefixes (empty: everything). "tailnet:" or "funnel:" restricts a
      prefix to one kind of client.
    '';
  };

  denyPrefixes = inheritable "denyPrefixes" {
    type = types.listOf prefix;
    default = [ ];
    example = [ "funnel:/admin" ];
    description = "Path prefixes refused with 404; they win over {option}`prefixes`.";
  };

  stripPrefix = inheritable "stripPrefix" {
    type = types.bool;
    default = true;
    description = "Remove the matched prefix from the path sent upstream.";
  };

  accessRules = inheritable "accessRules" {
    type = types.listOf (types.either (types.strMatching "(allow|deny)( .*)?") (types.submodule accessRuleModule));
    default = [ ];
    example = literalExpression ''
      [
        "allow user:alice@example.com"
        { action = "allow"; prefix = "/api/"; tags = [ "tag:monitoring" ]; }
        "deny"
      ]
    '';
    description = ''
      Access rules by tailnet identity, evaluated in order; the first match decides.
      A rule is a string `allow|deny [PREFIX] [user:LOGIN|domain:DOMAIN|node:NAME|tag:TAG|cap:CAP]...`
      or an attribute set of the same fields.
    '';
  };

  suppressWhois = inheritable "suppressWhois" {
    type = types.bool;
    default = false;
    description = "Do not look up the client's identity, and send no identity headers upstream.";
  };

  whoisTimeout = inheritable "whoisTimeout" {
    type = duration;
    default = 1;
    description = "Longest wait for a client identity lookup.";
  };

  identityHeaders = inheritable "identityHeaders" {
    type = types.listOf (
      types.enum [
        "tsnsrv"
        "serve"
      ]
    );
    default = [ "tsnsrv" ];
    example = [
      "tsnsrv"
      "serve"
    ];
    description = ''
      Identity header schemas sent upstream: "tsnsrv" (`X-Tailscale-User-LoginName`...,
      as the Go tsnsrv) and/or "serve" (`Tailscale-User-Login`..., as `tailscale serve`).
    '';
  };

  appCapabilities = inheritable "appCapabilities" {
    type = types.listOf types.str;
    default = [ ];
    example = [ "example.com/cap/books" ];
    description = ''Peer capabilities forwarded in `Tailscale-App-Capabilities` (needs the "serve" schema).'';
  };

  recommendedProxyHeaders = inheritable "recommendedProxyHeaders" {
    type = types.bool;
    default = true;
    description = "Send `Host`, `X-Scheme`, `X-Real-Ip` and `X-Forwarded-{Server,Port}` as nginx setups expect.";
  };

  upstreamHeaders = inheritable "upstreamHeaders" {
    type = types.attrsOf types.str;
    default = { };
    example = {
      X-Remote-User-Source = "tailnet";
    };
    description = "Extra headers set on every upstream request.";
  };

  assertions = inheritable "assertions" {
    type = types.bool;
    default = false;
    description = ''
      Also send each tailnet client's identity as a signed assertion (a JWS, EdDSA over
      Ed25519) in `X-Tailscale-Identity-Assertion`, which the upstream verifies with the
      service's public keys (`assertionJwksFile`), so that a local process calling the
      upstream directly cannot pose as a tailnet user. See docs/identity-assertions.md.
    '';
  };

  assertionAudience = inheritable "assertionAudience" {
    type = types.nullOr types.str;
    default = null;
    example = "grafana";
    description = "Audience (`aud`) of the assertions. Null means the service's machine name.";
  };

  assertionLifetime = inheritable "assertionLifetime" {
    type = duration;
    default = 60;
    description = "How long an assertion is valid (`exp` - `iat`); at least 1 second.";
  };

  assertionBindRequest = inheritable "assertionBindRequest" {
    type = types.bool;
    default = false;
    description = ''
      Bind each assertion to its request's method and target (`htm` and `htu` claims),
      signing every request instead of reusing one assertion per client until shortly
      before it expires.
    '';
  };

  assertionKeyRotation = inheritable "assertionKeyRotation" {
    type = duration;
    default = 604800;
    example = "720h";
    description = ''
      How long each signing key signs (at least `assertionLifetime`). Its successor is
      in the JWKS that long before it takes over, and a retired key stays there until
      its last assertion expired.
    '';
  };

  assertionJwksFile = inheritable "assertionJwksFile" {
    type = types.nullOr hostPath;
    default = null;
    example = "/var/lib/grafana/tsnsrv-jwks.json";
    description = ''
      Where the service writes its public keys (a JWKS, mode 0644) for the upstream.
      Null means `/run/tsnsrv-jwks.d/<name>.json` (`<name>` is the attribute name), in a
      directory that only the services' group `tsnsrv-jwks` may add files to. Another
      directory must exist and be writable by the service (e.g. through
      `supplementalGroups`); it is added to the unit's `ReadWritePaths=`. The keys are
      also on the control socket at `/jwks.json` (and on `metricsAddr`).
    '';
  };

  upstreamUnixAddr = inheritable "upstreamUnixAddr" {
    type = types.nullOr hostPath;
    default = null;
    example = "/run/calibre-web/socket";
    description = "Connect to the upstream over this unix socket (see {option}`supplementalGroups` for access).";
  };

  upstreamTCPAddr = inheritable "upstreamTCPAddr" {
    type = types.nullOr (types.strMatching ".+:[0-9]+");
    default = null;
    example = "192.168.1.10:8123";
    description = "Connect to this TCP address instead of the URL's host.";
  };

  insecureHTTPS = inheritable "insecureHTTPS" {
    type = types.bool;
    default = false;
    description = "Do not verify the upstream's TLS certificate. Insecure.";
  };

  upstreamCaFile = inheritable "upstreamCaFile" {
    type = types.nullOr types.path;
    default = null;
    description = "CA bundle to verify the upstream's TLS certificate with.";
  };

  upstreamAllowInsecureCiphers = inheritable "upstreamAllowInsecureCiphers" {
    type = types.bool;
    default = false;
    description = ''
      Allow upstream TLS cipher suites without forward secrecy (old appliances). Try
      it when the upstream connection fails with a handshake failure.
    '';
  };

  upstreamConnectTimeout = inheritable "upstreamConnectTimeout" {
    type = duration;
    default = 10;
    description = "Upstream connect timeout.";
  };

  upstreamRetryWindow = inheritable "upstreamRetryWindow" {
    type = duration;
    default = 10;
    example = "30s";
    description = ''
      While the upstream refuses connections (it is restarting, say after an update),
      keep trying this long before answering 502; the request waits with its body unread.
      0 answers 502 at once, as the Go tsnsrv does.
    '';
  };

  upstreamResponseHeaderTimeout = inheritable "upstreamResponseHeaderTimeout" {
    type = duration;
    default = 300;
    description = "Time the upstream has to start its response after the request was sent; 0 disables.";
  };

  upstreamIdleTimeout = inheritable "upstreamIdleTimeout" {
    type = duration;
    default = 0;
    example = "10m";
    description = "Abort an exchange when no bytes flow either way for this long; 0 never, so long polls and streams live on.";
  };

  metricsAddr = inheritable "metricsAddr" {
    type = types.nullOr (types.strMatching "(tailnet|.*):[0-9]+");
    default = null;
    example = "tailnet:9100";
    description = ''
      Also serve Prometheus metrics on this TCP address (`[HOST]:PORT`) or on this port
      of the service's tailnet node (`tailnet:PORT`). They are always on the control
      socket `/run/tsnsrv-<name>/control.sock`.
    '';
  };

  logLevel = inheritable "logLevel" {
    type = types.enum [
      "debug"
      "info"
      "warning"
      "error"
    ];
    default = "info";
    description = "Log level of the proxy.";
  };

  accessLog = inheritable "accessLog" {
    type = types.bool;
    default = true;
    description = "Log one line per request to the journal.";
  };

  shutdownTimeout = inheritable "shutdownTimeout" {
    type = duration;
    default = 20;
    description = "On stop, how long in-flight requests may take to finish.";
  };

  supplementalGroups = inheritable "supplementalGroups" {
    type = types.listOf types.str;
    default = [ ];
    example = [ "calibre-web" ];
    description = "Extra groups of the proxy, e.g. to reach an upstream unix socket or read a certificate.";
  };

  extraArgs = inheritable "extraArgs" {
    type = types.listOf types.str;
    default = [ ];
    example = [ "--log-level=debug" ];
    description = ''
      Extra command-line flags for the proxy, after `--config`: flags override the
      file. An escape hatch; every flag has an option above.
    '';
  };
}
