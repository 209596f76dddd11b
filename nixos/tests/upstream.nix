# The VM tests' upstream application (./upstream.py) and the Python it runs on:
# `upstream port flags` serves it on 127.0.0.1:port.
{ pkgs }:
rec {
  python = pkgs.python3.withPackages (ps: [
    ps.aiohttp
    ps.websockets
    # The scenarios verify tsnsrv's identity assertions as an upstream would.
    ps.pyjwt
    ps.cryptography
  ]);
  upstream = port: flags: "${python.interpreter} ${./upstream.py} 127.0.0.1 ${toString port} ${flags}";
}
