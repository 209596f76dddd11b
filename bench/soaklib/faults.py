"""The faults, and the seeded schedule they come in.

A schedule is planned once from the seed, before anything runs, so every candidate gets
the same faults in the same order with the same parameters: which fault, how many seconds
of traffic before it, how long a stopped part stays down, how many answers get reset. The
short schedule has every kind once, in a seeded order; the long one repeats seeded
permutations of all kinds until the planned time fills the duration.
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass
from typing import Any

from harness.headscale import Headscale
from harness.processes import wait_for
from harness.tailnet import TailscaleNode

from .rig import Certificates, SoakUpstream
from .targets import Candidate

RESET_FRAMINGS = ("length", "chunked", "close")
FAULT_KINDS = ("tailscaled-kill", "proxy-kill", "upstream-restart", *(f"upstream-rst-{f}" for f in RESET_FRAMINGS),
               "upstream-slow", "headscale-restart", "client-tailscaled-restart", "reload")

WHAT = {
    "tailscaled-kill": "kill -9 of the service's tailscaled",
    "proxy-kill": "kill -9 of the proxy; the supervisor starts it again",
    "upstream-restart": "the upstream stopped (SIGTERM), down for a while, started again",
    "upstream-rst-length": "the upstream resets (TCP RST) answers with Content-Length half-way",
    "upstream-rst-chunked": "the upstream resets chunked answers half-way",
    "upstream-rst-close": "the upstream resets close-delimited answers half-way",
    "upstream-slow": "the upstream answers past the timeouts: heads late, bodies stalled",
    "headscale-restart": "headscale stopped, down for a while, started again",
    "client-tailscaled-restart": "the client device's tailscaled restarted",
    "reload": "a new certificate in the files, then a reload (SIGHUP)",
}


@dataclass(frozen=True)
class Profile:
    """The sizes of one kind of run."""

    gap: tuple[float, float]  # seconds of traffic before each fault
    down: tuple[float, float]  # how long a stopped part stays down
    slow_window: tuple[float, float]  # how long the upstream stays slow
    resets: tuple[int, int]  # answers reset per reset fault
    settle: float  # seconds of traffic after recovery, before the checkpoint
    warmup: float  # seconds of traffic before the first checkpoint (the baseline)
    max_transfer: int
    max_events: int
    max_messages: int


PROFILES = {
    "short": Profile(gap=(4, 6), down=(3, 5), slow_window=(4, 5), resets=(2, 3), settle=2, warmup=8,
                     max_transfer=8 * 1024 * 1024, max_events=30, max_messages=60),
    "long": Profile(gap=(20, 60), down=(3, 15), slow_window=(5, 15), resets=(2, 5), settle=10, warmup=30,
                    max_transfer=300 * 1000 * 1000, max_events=300, max_messages=600),
}

# Planning only: what a cycle costs besides its gap and down time (recovery, checkpoint).
CYCLE_OVERHEAD = 15.0


@dataclass(frozen=True)
class PlannedFault:
    index: int
    kind: str
    gap: float
    down: float
    resets: int


def plan(seed: int, profile: Profile, duration: float | None) -> list[PlannedFault]:
    """Every kind once (duration None), or permutations until `duration` seconds are planned
    (the first permutation whole, so that every kind comes at least once)."""
    rng = random.Random(seed)
    faults: list[PlannedFault] = []
    planned = profile.warmup
    while True:
        order = list(FAULT_KINDS)
        rng.shuffle(order)
        for kind in order:
            window = profile.slow_window if kind == "upstream-slow" else profile.down
            fault = PlannedFault(len(faults), kind, round(rng.uniform(*profile.gap), 1),
                                 round(rng.uniform(*window), 1), rng.randint(*profile.resets))
            if duration is not None and len(faults) >= len(FAULT_KINDS) and \
                    planned + fault.gap + fault.down + CYCLE_OVERHEAD > duration:
                return faults  # every kind at least once, however short the duration
            faults.append(fault)
            planned += fault.gap + fault.down + CYCLE_OVERHEAD
        if duration is None:
            return faults


@dataclass
class Stage:
    """What the faults act on."""

    candidate: Candidate
    upstream: SoakUpstream
    headscale: Headscale
    laptop: TailscaleNode
    certificates: Certificates
    slow_head: float  # the upstream's delay before a head in upstream-slow (past the proxy's timeout)
    slow_stall: float  # its stall half-way through a body


def inject(stage: Stage, fault: PlannedFault) -> dict[str, Any]:
    """Does the fault; returns what happened, with `restored`: when the broken part was back
    (the candidate's own recovery, if any, is what the run measures from there)."""
    kind = fault.kind
    details: dict[str, Any] = {}
    if kind == "tailscaled-kill":
        details["pid"] = stage.candidate.kill_tailscaled()
    elif kind == "proxy-kill":
        details["pid"] = stage.candidate.kill_proxy()
    elif kind == "upstream-restart":
        stage.upstream.stop()
        time.sleep(fault.down)
        stage.upstream.start()
        details["down_s"] = fault.down
    elif kind.startswith("upstream-rst-"):
        details.update(_resets(stage.upstream, kind.removeprefix("upstream-rst-"), fault.resets))
    elif kind == "upstream-slow":
        stage.upstream.control(f"slow {stage.slow_head} {stage.slow_stall}")
        time.sleep(fault.down)
        stage.upstream.control("fast")
        details.update(window_s=fault.down, head_delay_s=stage.slow_head, stall_s=stage.slow_stall)
    elif kind == "headscale-restart":
        stage.headscale.stop()
        time.sleep(fault.down)
        stage.headscale.start()
        up = time.monotonic()
        # Over when the nodes are back in contact: the client device online with control, and
        # seeing the service's node online (which only control can tell it).
        laptop, ip = stage.laptop, stage.candidate.ip
        wait_for(lambda: laptop.status()["Self"].get("Online") and laptop.sees_online(ip), 120,
                 "the client and the service back in contact with headscale", interval=0.25)
        details.update(down_s=fault.down, reconnected_after_s=round(time.monotonic() - up, 1))
    elif kind == "client-tailscaled-restart":
        stage.laptop.stop()
        stage.laptop.start()
        wait_for(lambda: stage.laptop.status()["BackendState"] == "Running", 60, "the client's tailscaled Running")
    elif kind == "reload":
        details["serial"] = stage.certificates.issue()
        details["how"] = stage.candidate.reload()
    else:
        raise ValueError(f"unknown fault kind {kind!r}")
    details["restored"] = time.monotonic()
    return details


def _resets(upstream: SoakUpstream, framing: str, count: int) -> dict[str, Any]:
    before = len(upstream.control("status")["resets_done"])
    upstream.control(f"reset {framing} {count}")
    deadline = time.monotonic() + 30
    done: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        done = upstream.control("status")["resets_done"][before:]
        if len(done) >= count:
            break
        time.sleep(0.1)
    if len(done) < count:
        upstream.control(f"reset {framing} {len(done) - count}")  # disarm the rest
    return {"framing": framing, "armed": count, "reset_ids": [reset["id"] for reset in done]}


def as_record(fault: PlannedFault) -> dict[str, Any]:
    return asdict(fault)
