# The package set that tests/nix evaluates the module with: derivations that are only
# names and store paths (nothing is built), with what the module and the VM test's
# scenarios read from them.
{
  lib,
  tailscaleVersion ? "1.98.1",
}:
let
  fakeDerivation =
    name: extra:
    {
      type = "derivation";
      inherit name;
      outPath = "/nix/store/00000000000000000000000000000000-${name}";
    }
    // extra;
  pkgs = {
    # The package, or the sidecar image built by the module's own expression.
    callPackage =
      fn: args:
      if baseNameOf (toString fn) == "oci-image.nix" then
        import fn (
          {
            inherit lib;
            inherit (pkgs) dockerTools cacert;
          }
          // args
        )
      else
        fakeDerivation "tsnsrv-0.1.0" {
          version = "0.1.0";
          meta.mainProgram = "tsnsrv";
        };
    # nixpkgs' tailscale as nixos/tailscale-trimmed.nix reads and overrides it: overrideAttrs
    # merges the new attributes and lifts passthru to the top, as mkDerivation does.
    tailscale =
      let
        package =
          attrs:
          fakeDerivation "tailscale-${tailscaleVersion}" (
            attrs // attrs.passthru // { overrideAttrs = f: package (attrs // f attrs); }
          );
      in
      package {
        version = tailscaleVersion;
        tags = [ "ts_include_cli" ];
        passthru = { };
        meta.description = "Node agent for Tailscale, a mesh VPN built on WireGuard";
      };
    coreutils = fakeDerivation "coreutils-9.7" { };
    # What NixOS puts on every service's PATH, and in its global environment.
    findutils = fakeDerivation "findutils-4.10.0" { };
    gnugrep = fakeDerivation "gnugrep-3.12" { };
    gnused = fakeDerivation "gnused-4.9" { };
    systemd = fakeDerivation "systemd-258" { };
    glibcLocales = fakeDerivation "glibc-locales-2.40" { };
    python3 = fakeDerivation "python3-3.13" {
      interpreter = "/nix/store/00000000000000000000000000000000-python3-3.13/bin/python3";
      withPackages =
        _f:
        fakeDerivation "python3-3.13-env" {
          interpreter = "/nix/store/00000000000000000000000000000000-python3-3.13-env/bin/python3";
        };
    };
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
    # The sidecar image (nixos/oci-image.nix) as the module reads it.
    dockerTools = {
      buildLayeredImage =
        args:
        fakeDerivation "docker-image-${args.name}.tar.gz" {
          imageName = args.name;
          imageTag = args.tag;
          passthru.config = args.config;
        };
      caCertificates = fakeDerivation "ca-certificates" { };
    };
    cacert = fakeDerivation "nss-cacert-3.115" { };
    stdenv = {
      buildPlatform.canExecute = _: true;
      hostPlatform.system = "x86_64-linux";
    };
  };
in
pkgs
