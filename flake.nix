{
  description = "tsnsrv: local web services on a Tailscale tailnet, each as its own machine";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-26.05";

  outputs =
    { self, nixpkgs }:
    let
      inherit (nixpkgs) lib;

      linuxSystems = [
        "x86_64-linux"
        "aarch64-linux"
      ];
      # The runtime is Linux-first (sock_diag, seccomp, systemd), but the package and
      # its unit tests build on macOS too, for `tsnsrv check` and development.
      allSystems = linuxSystems ++ [
        "x86_64-darwin"
        "aarch64-darwin"
      ];

      forSystems =
        systems: f: lib.genAttrs systems (system: f system nixpkgs.legacyPackages.${system});
    in
    {
      overlays.default = final: _prev: {
        tsnsrv = final.callPackage ./nixos/package.nix { };
        tailscaleTrimmed = final.callPackage ./nixos/tailscale-trimmed.nix { };
      };

      packages = lib.recursiveUpdate
        (forSystems allSystems (
          _system: pkgs: rec {
            tsnsrv = pkgs.callPackage ./nixos/package.nix { };
            default = tsnsrv;
          }
        ))
        (forSystems linuxSystems (
          system: pkgs: {
            # The sidecar image of virtualisation.oci-sidecars.tsnsrv.
            tsnsrvOciImage = pkgs.callPackage ./nixos/oci-image.nix { inherit (self.packages.${system}) tsnsrv; };
            # tailscale with only what tsnsrv's nodes use, for tailscalePackage
            # (docs/trimmed-tailscaled.md); compiled locally.
            tailscaleTrimmed = pkgs.callPackage ./nixos/tailscale-trimmed.nix { };
          }
        ));

      nixosModules = {
        tsnsrv = ./nixos/module.nix;
        default = self.nixosModules.tsnsrv;
      };

      checks = forSystems linuxSystems (
        system: pkgs:
        {
          package = self.packages.${system}.tsnsrv;
        }
        // import ./nixos/tests {
          inherit pkgs;
          module = self.nixosModules.tsnsrv;
        }
      );

      devShells = forSystems allSystems (
        _system: pkgs: {
          default = pkgs.mkShell {
            packages = [
              (pkgs.python3.withPackages (
                ps: with ps; [
                  aiohttp
                  attrs
                  cattrs
                  prometheus-client
                  pytest
                  pytest-asyncio
                  pytest-timeout
                  hypothesis
                  websockets
                  trustme
                  dnslib
                  h11
                ]
              ))
              pkgs.tailscale
              pkgs.headscale
              pkgs.nixfmt
              pkgs.ruff
              pkgs.mypy
            ];
          };
        }
      );

      # nixfmt (RFC 166 style) over the whole tree, as `nix fmt` expects.
      formatter = forSystems allSystems (_system: pkgs: pkgs.nixfmt-tree);
    };
}
