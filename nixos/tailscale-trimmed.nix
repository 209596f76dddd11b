# nixpkgs' tailscale with only the features tsnsrv's nodes use (docs/trimmed-tailscaled.md):
# the same source and build, with tailscale's `ts_omit_<feature>` tag for every feature
# that ./tailscale-features.txt omits (the list scripts/tailnet-binaries builds the tests'
# copy from). Compiled locally: the binary cache has only the stock package.
{
  lib,
  tailscale,
}:
let
  # "omit <feature>  <why>" lines; comments, blank lines and kept features are skipped.
  omitted = lib.concatMap (
    line:
    let
      entry = builtins.match "omit +([a-z0-9_]+) .*" line;
    in
    lib.optional (entry != null) (builtins.head entry)
  ) (lib.splitString "\n" (builtins.readFile ./tailscale-features.txt));
in
tailscale.overrideAttrs (old: {
  # nixpkgs builds the CLI into tailscaled (ts_include_cli); it stays.
  tags = (old.tags or [ ]) ++ map (feature: "ts_omit_${feature}") omitted;
  passthru = (old.passthru or { }) // {
    # What the module checks options against (e.g. log upload needs logtail).
    omittedFeatures = omitted;
  };
  meta = old.meta // {
    description = "${old.meta.description or "tailscale"} (trimmed to what tsnsrv's service nodes use)";
  };
})
