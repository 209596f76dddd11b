"""The short soak under faults: `bench/soak --short` (ours only, every fault kind once, a
few minutes), and every invariant it checks must hold. bench/README.md says what each one
means; the long run is the same command without --short."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from harness.processes import ManagedProcess

REPO = Path(__file__).resolve().parents[2]
FAULT_KINDS = {"tailscaled-kill", "proxy-kill", "upstream-restart", "upstream-rst-length", "upstream-rst-chunked",
               "upstream-rst-close", "upstream-slow", "headscale-restart", "client-tailscaled-restart", "reload"}

# node: on the stock and the trimmed tailscale alike (scripts/test runs `-m node` on each).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200), pytest.mark.node]


def test_the_short_soak_holds_every_invariant(bin_dir: Path, node_bin_dir: Path, tailscaled_user: str | None,
                                              tmp_path: Path) -> None:
    out = tmp_path / "results"
    soak = ManagedProcess("soak", [sys.executable, str(REPO / "bench" / "soaklib" / "run.py"), "--bin-dir",
                                   str(bin_dir), "--tailscale-bin-dir", str(node_bin_dir), "--short", "--seed", "1",
                                   "--out", str(out)], tmp_path / "soak.log")
    soak.start()
    status = soak.wait(1100)
    results = out / "results.json"
    assert results.exists(), f"the soak ended ({status}) without results:\n{soak.log_tail(80)}"
    print((out / "results.md").read_text())
    result = json.loads(results.read_text())["results"][0]

    injected = {fault["kind"] for fault in result["faults"] if "t_inject" in fault and "error" not in fault}
    assert injected == FAULT_KINDS, f"not injected: {FAULT_KINDS - injected}"
    assert result["totals"].get("ok", 0) > 1000, "too little traffic to prove anything"
    assert not result["client_errors"], f"the soak's own clients failed: {result['client_errors']}"
    violated = [f"{name}: {numbers}" for name, held, numbers in result["verdicts"] if not held]
    assert not violated, "invariants violated (details above):\n" + "\n".join(violated)
    assert status == 0
