# The tsnsrv Python application, built from python/pyproject.toml as it is.
{
  lib,
  python3Packages,
}:
python3Packages.buildPythonApplication {
  pname = "tsnsrv";
  version = (lib.importTOML ../python/pyproject.toml).project.version;
  pyproject = true;

  # Only what the build and the unit tests read, so that editing the module or the
  # end-to-end suites does not rebuild the package (docs/options.md is in, for its option table).
  src = lib.fileset.toSource {
    root = ../.;
    fileset = lib.fileset.unions [
      ../python/pyproject.toml
      ../python/tsnsrv
      ../pytest.ini
      # tests/unit/test_docs.py checks the option table of docs/options.md against the model, and
      # the assertion page's examples against the test verifiers (in tests/harness).
      ../docs/options.md
      ../docs/identity-assertions.md
      ../tests/conftest.py
      ../tests/harness
      ../tests/unit
    ];
  };
  sourceRoot = "source/python";

  build-system = [ python3Packages.setuptools ];

  dependencies = with python3Packages; [
    aiohttp
    attrs
    cattrs
    prometheus-client
    pyjwt
    cryptography
  ];

  # pyproject.toml pins exact releases for the development virtualenv; nixpkgs brings
  # its own, tested, versions.
  pythonRelaxDeps = true;

  nativeCheckInputs = with python3Packages; [
    pytestCheckHook
    pytest-asyncio
    pytest-timeout
    hypothesis
    websockets
    trustme
    dnslib
    h11
    cryptography
  ];

  # Only the unit tests: the end-to-end suites need root, network namespaces and the
  # tailnet binaries, which the sandbox does not have (the NixOS VM tests cover them).
  # pytest runs from the repository root so that pytest.ini and tests/conftest.py
  # apply, but imports the installed package rather than python/ (`-o pythonpath`).
  preCheck = ''
    cd ..
  '';
  pytestFlags = [
    "-o"
    "pythonpath=tests"
    "-p"
    "no:cacheprovider"
  ];
  enabledTestPaths = [ "tests/unit" ];
  # These run the console script found next to sys.executable (a virtualenv's layout);
  # here the interpreter and the installed script live in different store paths.
  disabledTests = [ "test_console_script" ];

  pythonImportsCheck = [ "tsnsrv" ];

  meta = {
    description = "Expose local web services on a Tailscale tailnet, each as its own machine";
    license = lib.licenses.mit;
    mainProgram = "tsnsrv";
    platforms = lib.platforms.linux ++ lib.platforms.darwin;
  };
}
