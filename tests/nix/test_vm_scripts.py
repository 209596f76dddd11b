"""The NixOS VM tests' scripts (nixos/tests/*.nix), which only a NixOS host with KVM runs:
here each is evaluated with the stub package set, compiled, and every name it reads is
one it defines, a builtin, a test-driver global or one of the test's machines, as the
driver's own lint (pyflakes) would demand before it boots anything."""

from __future__ import annotations

import ast
import builtins

import pytest

from harness.nixtools import NIXOS, NIXPKGS_LIB, NO_LIB_REASON, TESTS, nix_eval, nix_string

pytestmark = pytest.mark.skipif(NIXPKGS_LIB is None, reason=NO_LIB_REASON)

# What nixos/lib/test-driver hands a script besides one global per machine.
DRIVER_GLOBALS = {"start_all", "subtest", "polling_condition", "machines", "driver", "log", "retry",
                  "join_all", "serial_stdout_on", "serial_stdout_off", "create_machine", "vlans"}


def vm_test(name: str) -> dict:
    """The test's machine names and its script, with a stand-in for `nodes` where the
    script needs the built configuration (a store path is all it takes from it)."""
    expr = f"""
      let
        lib = import {nix_string(NIXPKGS_LIB)};
        pkgs = import {nix_string(TESTS / 'stub-pkgs.nix')} {{ inherit lib; tailscaleVersion = "1.0"; }};
        test = import {nix_string(NIXOS / 'tests' / name)} {{ inherit lib pkgs; }};
        nodes = lib.mapAttrs (_: _: {{ system.build.toplevel = "/nix/store/0000-nixos-system"; }}) test.nodes;
      in {{
        machines = builtins.attrNames test.nodes;
        script = if builtins.isFunction test.testScript then test.testScript {{ inherit nodes; }} else test.testScript;
      }}"""
    return nix_eval(expr)


def names_read_but_never_bound(tree: ast.AST) -> set[str]:
    bound: set[str] = set()
    read: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            (read if isinstance(node.ctx, ast.Load) else bound).add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, ast.alias):
            bound.add((node.asname or node.name).split(".")[0])
    return read - bound - set(dir(builtins))


@pytest.mark.parametrize("name", ["tailnet.nix", "oci.nix"])
def test_the_vm_tests_script_compiles_and_names_only_what_the_driver_defines(name: str) -> None:
    test = vm_test(name)
    tree = ast.parse(test["script"], filename=f"nixos/tests/{name} (testScript)")
    unknown = names_read_but_never_bound(tree) - DRIVER_GLOBALS - set(test["machines"])
    assert not unknown, f"nixos/tests/{name}: the script reads names nothing defines: {sorted(unknown)}"


def test_the_check_can_fail() -> None:
    assert names_read_but_never_bound(ast.parse("def f(a):\n    return a + udp_probe\n")) == {"udp_probe"}
