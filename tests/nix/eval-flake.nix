# flake.nix and nixos/package.nix evaluated with the real nixpkgs `lib` and a stub
# package set: the flake's output structure and the package's declared inputs, without
# a nixpkgs checkout or a build.
{ lib }:
let
  flake = import ../../flake.nix;
  allSystems = [
    "x86_64-linux"
    "aarch64-linux"
    "x86_64-darwin"
    "aarch64-darwin"
  ];

  fake = name: extra: {
    type = "derivation";
    inherit name;
    outPath = "/nix/store/00000000000000000000000000000000-${name}";
  } // extra;

  python3Packages =
    lib.genAttrs [
      "aiohttp"
      "attrs"
      "cattrs"
      "pyjwt"
      "prometheus-client"
      "setuptools"
      "pytestCheckHook"
      "pytest"
      "pytest-asyncio"
      "pytest-timeout"
      "hypothesis"
      "websockets"
      "trustme"
      "dnslib"
      "h11"
      "cryptography"
    ] (name: fake name { pname = name; })
    // {
      buildPythonApplication = attrs: attrs;
    };

  package = import ../../nixos/package.nix { inherit lib python3Packages; };

  stubPkgs = system: {
    inherit system;
    callPackage = path: _args: fake "called-${baseNameOf path}" { inherit path; };
    testers.runNixOSTest = test: fake "nixos-test" { inherit test; };
    mkShell = args: fake "shell" { inherit (args) packages; };
    python3.withPackages = _f: fake "python-env" { };
    nixfmt-tree = fake "nixfmt-tree" { };
    tailscale = fake "tailscale" { };
    headscale = fake "headscale" { };
    nixfmt = fake "nixfmt" { };
    ruff = fake "ruff" { };
    mypy = fake "mypy" { };
  };

  nixpkgs = {
    inherit lib;
    legacyPackages = lib.genAttrs allSystems stubPkgs;
  };
  outputs = flake.outputs {
    self = outputs;
    inherit nixpkgs;
  };
  names = lib.mapAttrs (_: builtins.attrNames);
in
{
  inputs = lib.mapAttrs (_: input: input.url) flake.inputs;
  packages = names outputs.packages;
  packageFile = baseNameOf outputs.packages.x86_64-linux.default.path;
  checks = names outputs.checks;
  devShells = names outputs.devShells;
  formatter = lib.mapAttrs (_: f: f.name) outputs.formatter;
  nixosModules = lib.mapAttrs (_: toString) outputs.nixosModules;
  overlay = builtins.attrNames (outputs.overlays.default (stubPkgs "x86_64-linux") { });
  vmTests = lib.mapAttrs (_: check: check.test.imports or null) (
    builtins.removeAttrs outputs.checks.x86_64-linux [ "package" ]
  );
  # The files the flake's trimmed tailscale and the trimmed VM test's services are called from.
  trimmedPackageFile = baseNameOf outputs.packages.x86_64-linux.tailscaleTrimmed.path;
  overlayTrimmedFile = baseNameOf (outputs.overlays.default (stubPkgs "x86_64-linux") { }).tailscaleTrimmed.path;
  vmTrimmedTailscaleFile =
    baseNameOf
      outputs.checks.x86_64-linux.vm-tailnet-trimmed.test.nodes.server.services.tsnsrv.defaults.tailscalePackage.path;

  package = {
    inherit (package)
      pname
      version
      pyproject
      sourceRoot
      enabledTestPaths
      disabledTests
      pytestFlags
      pythonRelaxDeps
      ;
    inherit (package.meta) mainProgram platforms;
    dependencies = map (p: p.pname) package.dependencies;
    checkInputs = map (p: p.pname) package.nativeCheckInputs;
  };
}
