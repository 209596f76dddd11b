# The OCI image of a tsnsrv sidecar (virtualisation.oci-sidecars.tsnsrv): tsnsrv and the
# tailscaled it spawns, CA certificates, nothing else; layered, and run as an
# unprivileged account (65532, as distroless images name "nonroot").
{
  lib,
  dockerTools,
  cacert,
  tsnsrv,
  tailscale,
}:
dockerTools.buildLayeredImage {
  name = "tsnsrv";
  tag = tsnsrv.version;
  contents = [
    tsnsrv
    tailscale
    dockerTools.caCertificates
  ];
  # Where tsnsrv keeps the spawned tailscaled's socket (a non-root process's default).
  extraCommands = ''
    mkdir -p tmp
    chmod 1777 tmp
  '';
  config = {
    Entrypoint = [ (lib.getExe tsnsrv) ];
    User = "65532:65532";
    Env = [
      "PATH=/bin"
      "SSL_CERT_FILE=${cacert}/etc/ssl/certs/ca-bundle.crt"
    ];
    Volumes."/state" = { };
  };
}
