# Options of the Go tsnsrv's module that this one does not have. A configuration carried
# over from it is refused with what to write instead, not with "does not exist": as
# hidden options that must stay unset, wherever a service's options are (services,
# defaults, OCI sidecars).
{ lib }:
let
  instead = {
    listenAddr = ''use listenPort, a port number (listenAddr = ":8443" becomes listenPort = 8443)'';
    tsnetVerbose = "use tailscaledVerbose: each service runs a tailscaled of its own, which takes the place of tsnet";
    suppressTailnetDialer = "remove it: tsnsrv has no tailnet dialer and always reaches upstreams from the host";
  };
in
{
  options = lib.mapAttrs (
    option: _:
    lib.mkOption {
      visible = false;
      type = lib.types.nullOr lib.types.anything;
      default = null;
      description = "The Go tsnsrv's `${option}`, refused with what to use instead.";
    }
  ) instead;

  # `where`: the option path of `service`, as the messages name it.
  assertions =
    where: service:
    lib.mapAttrsToList (option: use: {
      assertion = service.${option} == null;
      message = "${where}.${option} is an option of the Go tsnsrv's module, not of this one: ${use}.";
    }) instead;
}
