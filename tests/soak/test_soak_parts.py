"""The soak's own judgement, on made-up records: the body check, the schedule, fault
attribution, the metric comparison and the resource rule; and its report of runs made
apart. (The run itself is test_soak.py.)"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from soaklib import analysis, bodies, report  # noqa: E402
from soaklib.faults import FAULT_KINDS, PROFILES, plan  # noqa: E402


def check(seed: int, size: int, data: bytes) -> bodies.BodyCheck:
    body = bodies.BodyCheck(seed, size)
    for start in range(0, len(data), 10_000):  # in pieces that straddle block boundaries
        body.feed(data[start:start + 10_000])
    return body


SIZE = 3 * bodies.BLOCK + 123


def test_the_body_check_tells_a_whole_body_from_every_kind_of_wrong_one() -> None:
    right = bodies.expected(7, 0, SIZE)
    assert check(7, SIZE, right).complete
    assert check(7, SIZE, right).sha256() == bodies.sha256_of(7, SIZE)

    cut = check(7, SIZE, right[:-1])
    assert (cut.complete, cut.problem) == (False, None)  # short: the framing must tell, not the bytes

    flipped = bytearray(right)
    flipped[bodies.BLOCK + 99] ^= 1
    corrupt = check(7, SIZE, bytes(flipped))
    assert (corrupt.problem, corrupt.problem_offset) == ("corrupt", bodies.BLOCK + 99)

    foreign = check(7, SIZE, right[:bodies.BLOCK] + bodies.expected(8, bodies.BLOCK, SIZE - bodies.BLOCK))
    assert foreign.problem == "foreign"
    assert bodies.BLOCK <= foreign.problem_offset < bodies.BLOCK + 16  # in the block's header: the seed

    assert check(7, SIZE, right + b"x").problem == "too long"


def test_the_schedule_is_the_seeds_and_has_every_kind() -> None:
    short = PROFILES["short"]
    assert plan(1, short, None) == plan(1, short, None)
    assert plan(1, short, None) != plan(2, short, None)
    assert sorted(f.kind for f in plan(1, short, None)) == sorted(FAULT_KINDS)
    ten_minutes = plan(1, PROFILES["long"], 600)
    assert {f.kind for f in ten_minutes} == set(FAULT_KINDS), "even a short duration has every kind once"
    assert len(plan(1, PROFILES["long"], 3600)) > 3 * len(FAULT_KINDS)


def exchange(start: float, end: float, opened: float | None = None, result: str = "failed") -> dict[str, Any]:
    return {"start": start, "end": end, "opened": start if opened is None else opened, "result": result}


def test_a_failure_belongs_to_a_fault_only_if_its_connection_lived_through_it() -> None:
    fault = {"index": 0, "kind": "proxy-kill", "t_inject": 100.0, "restored": 100.0, "recovered": 107.0}
    spans = analysis.windows([fault], recovery_timeout=120)
    assert analysis.attribute(exchange(99.5, 101.0), spans) is fault  # in flight at the kill
    assert analysis.attribute(exchange(120.0, 121.0, opened=95.0), spans) is fault  # its connection was
    assert analysis.attribute(exchange(110.0, 111.0), spans) is None  # started after recovery
    assert analysis.attribute(exchange(90.0, 98.0), spans) is None


def checkpoint(after: str, pid: int = 1, total: float = 0, fives: float = 0, twos: float = 0,
               client: dict[str, int] | None = None, fds: int = 16, tasks: int | None = 8,
               rss_mib: float = 40) -> dict[str, Any]:
    return {"after": after, "pid": pid, "fds": fds, "tasks": tasks, "rss_kib": rss_mib * 1024,
            "metrics": {"total": total, "2xx": twos, "5xx": fives, "websockets": 0.0}, "client": client or {}}


def test_metrics_must_count_what_the_clients_sent_and_saw() -> None:
    seen = {"sent": 10, "5xx": 2, "2xx": 8, "ok-2xx": 8}
    agreeing = [checkpoint("warm-up"), checkpoint("upstream-restart", total=10, fives=2, twos=8, client=seen)]
    assert analysis.metrics_agreement(agreeing)["held"]
    unseen_502 = [checkpoint("warm-up"), checkpoint("upstream-restart", total=10, fives=3, twos=7, client=seen)]
    assert not analysis.metrics_agreement(unseen_502)["held"]
    hung_up = {**seen, "sent": 11, "unanswered": 1}  # one more, whose client was gone before its 502 came
    racing = [checkpoint("warm-up"), checkpoint("upstream-restart", total=11, fives=3, twos=8, client=hung_up)]
    assert analysis.metrics_agreement(racing)["held"]
    restarted = [checkpoint("warm-up"), checkpoint("proxy-kill", pid=2, total=3, client=seen)]
    assert analysis.metrics_agreement(restarted)["epochs"][0]["compared"] is False


@pytest.mark.parametrize(("rss", "held"), [
    ([40, 55, 63, 70, 70, 70.2, 70.2, 74, 74, 73, 74, 74.5, 74, 75, 75, 75], True),  # climbs to a peak, steps up
    ([40 + fault for fault in range(16)], False),  # a megabyte per fault
    ([40 + fault for fault in range(8)], True),  # too short a life to judge
])
def test_rss_may_step_up_to_a_peak_but_not_grow_with_every_fault(rss: list[float], held: bool) -> None:
    checkpoints = [checkpoint(f"fault {i}", rss_mib=value) for i, value in enumerate(rss)]
    assert analysis.resources(checkpoints, rss_step_limit_mib=0.5)["held"] is held


def test_a_descriptor_or_task_more_than_the_baseline_is_a_leak() -> None:
    assert not analysis.resources([checkpoint("warm-up"), checkpoint("reload", fds=17)], 0.5)["held"]
    assert not analysis.resources([checkpoint("warm-up"), checkpoint("reload", tasks=9)], 0.5)["held"]
    unread = [checkpoint("warm-up", tasks=None), checkpoint("reload", tasks=None)]
    assert not analysis.resources(unread, 0.5, counts_tasks=True)["held"], "no task count is no proof"
    assert analysis.resources(unread, 0.5, counts_tasks=False)["held"]


PUBLISHED = Path(__file__).resolve().parents[2] / "bench" / "results" / "soak"


def run_folder(folder: Path, label: str, **changes: Any) -> Path:
    """A copy of the published run's results, as if `label` had made it."""
    document = json.loads((PUBLISHED / "results.json").read_text())
    published_label = document["runs"][0]["label"]  # of the first candidate published
    document["runs"], document["results"] = document["runs"][:1], document["results"][:1]
    for part in (*document["runs"], *document["results"]):
        part["label"] = label
    document["started"] = {label: "2026-12-07T05:00:00Z"}
    document.update(changes)
    folder.mkdir()
    (folder / "results.json").write_text(json.dumps(document))
    shutil.copyfile(PUBLISHED / f"plot-{published_label}.png", folder / f"plot-{label}.png")
    return folder


def test_runs_made_apart_stand_side_by_side_only_on_the_same_schedule(tmp_path: Path) -> None:
    ours, go = run_folder(tmp_path / "ours", "tsnsrv"), run_folder(tmp_path / "go", "go-tsnsrv")
    report.combine([ours, go], tmp_path / "both")

    text = (tmp_path / "both" / "results.md").read_text()
    assert "| tsnsrv: failed requests / sessions |" in text and "| go-tsnsrv: failed requests / sessions |" in text
    assert "## tsnsrv" in text and "## go-tsnsrv" in text
    assert {p.name for p in (tmp_path / "both").glob("plot-*.png")} == {"plot-tsnsrv.png", "plot-go-tsnsrv.png"}
    combined = json.loads((tmp_path / "both" / "results.json").read_text())
    assert [run["label"] for run in combined["runs"]] == ["tsnsrv", "go-tsnsrv"]

    other_seed = run_folder(tmp_path / "other", "go-tsnsrv", seed=2)
    with pytest.raises(SystemExit, match="differs .* in seed"):
        report.combine([ours, other_seed], tmp_path / "never")
    with pytest.raises(SystemExit, match="appears twice"):
        report.combine([ours, ours], tmp_path / "never")
    with pytest.raises(SystemExit, match=f"no results.json in {tmp_path};"):
        report.combine([ours, tmp_path], tmp_path / "never")
    assert not (tmp_path / "never").exists()
