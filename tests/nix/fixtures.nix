# Service declarations as a user writes them in configuration.nix (the option values
# under services.tsnsrv.services.<name>), with what the module would resolve from the
# rest of the system (`acmeDirectory`). The first three are the blog post's setup.
{
  # calibre-web, with the Kobo sync endpoint on the public internet through Funnel.
  books.options = {
    toURL = "http://127.0.0.1:8083";
    funnel = true;
    # Only the Kobo sync API is public; the tailnet gets everything. The Kobo reader
    # expects its full path upstream, so nothing is stripped.
    prefixes = [
      "tailnet:/"
      "funnel:/kobo/"
    ];
    stripPrefix = false;
    authKeyPath = "/run/secrets/tailscale-authkey";
  };

  # home-assistant, private to the tailnet, from urlParts, both header schemas.
  home.options = {
    urlParts = {
      protocol = "http";
      host = "127.0.0.1";
      port = 8123;
    };
    identityHeaders = [
      "tsnsrv"
      "serve"
    ];
    upstreamIdleTimeout = "10m";
    authKeyPath = "/run/secrets/tailscale-authkey";
    # Signed identity, bound to each request; the keys in the module's default place.
    assertions = true;
    assertionBindRequest = true;
  };

  # alertmanager: for its owner only, whatever the tailnet policy lets through.
  alertmanager.options = {
    toURL = "http://127.0.0.1:9093";
    accessRules = [
      "allow user:me@example.com"
      {
        action = "allow";
        prefix = "/api/v2/alerts";
        tags = [ "tag:monitoring" ];
      }
      "deny"
    ];
    metricsAddr = "tailnet:9100";
    authKeyPath = "/run/secrets/tailscale-authkey";
  };

  # docspell over a unix socket, no identity lookups (the Go module drops this option).
  docs.options = {
    toURL = "http://docspell";
    upstreamUnixAddr = "/run/docspell/http.sock";
    suppressWhois = true;
    plaintext = true;
    loginServerUrl = "https://headscale.example.com";
    shutdownTimeout = "1m";
  };

  # A certificate from security.acme; Grafana's JWT authentication verifies the
  # identity assertions with the keys written where it reads them.
  grafana = {
    options = {
      toURL = "https://127.0.0.1:3000";
      acmeHost = "grafana.example.com";
      insecureHTTPS = true;
      assertions = true;
      assertionAudience = "grafana";
      assertionLifetime = "30s";
      assertionKeyRotation = "720h";
      assertionJwksFile = "/var/lib/grafana/tsnsrv-jwks.json";
    };
    acmeDirectory = "/var/lib/acme/grafana.example.com";
  };

  # Every runtime option the module passes, set to something other than its default.
  everything.options = {
    name = "every-thing";
    toURL = "https://10.0.0.5:8443/base";
    loginServerUrl = "https://headscale.example.com";
    authKeyPath = "/run/secrets/oauth-client";
    tags = [
      "tag:web"
      "tag:prod"
    ];
    ephemeral = true;
    timeout = "5m";
    tailscaledVerbose = true;
    tailscaledLogUpload = true;
    listenPort = 8443;
    plaintext = false;
    certificateFile = "/etc/ssl/every/fullchain.pem";
    certificateKey = "/etc/ssl/every/key.pem";
    funnel = true;
    funnelOnly = true;
    readHeaderTimeout = "10s";
    funnelReadHeaderTimeout = 2;
    frontAddress = "127.0.0.3";
    prefixes = [ "/app/" ];
    denyPrefixes = [ "/app/admin" ];
    stripPrefix = false;
    accessRules = [ "deny funnel:/app/private" ];
    suppressWhois = true;
    whoisTimeout = "500ms";
    identityHeaders = [ "serve" ];
    appCapabilities = [ "example.com/cap/web" ];
    recommendedProxyHeaders = false;
    upstreamHeaders = {
      X-Forwarded-Prefix = "/base";
    };
    upstreamTCPAddr = "10.0.0.6:8443";
    insecureHTTPS = false;
    upstreamCaFile = "/etc/ssl/internal-ca.pem";
    upstreamAllowInsecureCiphers = true;
    upstreamConnectTimeout = 3;
    upstreamResponseHeaderTimeout = "2m";
    upstreamIdleTimeout = 600;
    metricsAddr = "127.0.0.1:9101";
    logLevel = "debug";
    accessLog = false;
    shutdownTimeout = 45;
  };
}
