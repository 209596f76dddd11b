"""From what the clients, the upstream, the samplers and the fault log recorded, to the
invariants and the per-fault table.

Attribution: a fault's window runs from its injection to the first probe that succeeded
after the broken part was back (plus a second either side). An exchange was in flight at
the fault when its connection's life (from opening to the exchange's end) overlaps the
window. The clients close every connection at each checkpoint, so a connection never
spans two faults.
"""

from __future__ import annotations

import collections
import contextlib
import json
import statistics
from pathlib import Path
from typing import Any

SESSION_KINDS = ("websocket", "sse")
MARGIN = 1.0  # seconds either side of a fault's window
VIOLATION_CLASSES = ("wrong-answer", "corrupt", "cut-complete", "lost")
# Epochs in which every request the clients sent reached the proxy and every answer the
# proxy counted reached a client: there the metrics must agree exactly. (A killed
# tailscaled or proxy, or a restarted client device, drops exchanges on the way.)
EXACT_EPOCHS = ("warm-up", "upstream-restart", "upstream-rst-length", "upstream-rst-chunked", "upstream-rst-close",
                "upstream-slow", "headscale-restart", "reload")


def json_lines(path: Path) -> list[dict[str, Any]]:
    """An events file (a line cut short by a killed writer is skipped)."""
    if not path.exists():
        return []
    lines = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            lines.append(json.loads(line))
    return lines


def windows(faults: list[dict[str, Any]], recovery_timeout: float) -> list[tuple[float, float, dict[str, Any]]]:
    result = []
    for fault in faults:
        if "t_inject" not in fault:
            continue
        end = fault.get("recovered") or fault.get("restored", fault["t_inject"]) + recovery_timeout
        result.append((fault["t_inject"] - MARGIN, end + MARGIN, fault))
    return result


def attribute(exchange: dict[str, Any], spans: list[tuple[float, float, dict[str, Any]]]) -> dict[str, Any] | None:
    begin = min(exchange["opened"], exchange["start"])
    for start, end, fault in spans:
        if begin <= end and exchange["end"] >= start:
            return fault
    return None


def serial_number(text: str) -> int:
    return int(text, 16)


def analyse(run: dict[str, Any], recovery_timeout: float, rss_step_limit_mib: float) -> dict[str, Any]:
    events = json_lines(run["client_events"])
    upstream_events = json_lines(run["upstream_events"])
    exchanges = [e for e in events if e["event"] == "exchange"]
    by_id = {e["id"]: e for e in exchanges}
    spans = windows(run["faults"], recovery_timeout)
    per_fault: dict[int, dict[str, Any]] = {}
    for fault in run["faults"]:
        per_fault[fault["index"]] = {"failed_requests": 0, "failed_sessions": 0, "violations": 0, "failures": {}}
    unexplained: list[dict[str, Any]] = []
    unanswered: list[dict[str, Any]] = []  # connects without a SYN-ACK, outside faults
    violations: list[dict[str, Any]] = []
    hangs = 0
    # Close-delimited answers the upstream was writing when it exited: they ended with a FIN
    # like a complete one, and nobody downstream can tell. Not counted against the proxy.
    cut_by_exit = {request_id for event in upstream_events if event["event"] == "exit"
                   for request_id, framing in event["answering"].items() if framing == "close"}
    excused = []
    for exchange in exchanges:
        if exchange["result"] not in ("failed", "violation"):
            continue
        if exchange.get("violation") == "cut-complete" and exchange["id"] in cut_by_exit:
            excused.append(exchange)
            continue
        fault = attribute(exchange, spans)
        if exchange["result"] == "violation":
            violations.append({**exchange, "fault": fault["kind"] if fault else None})
        if fault is None:
            if exchange["result"] == "failed":
                (unanswered if exchange["what"] == "connect-timeout" else unexplained).append(exchange)
            continue
        tally = per_fault[fault["index"]]
        if exchange["result"] == "violation":
            tally["violations"] += 1
        elif exchange["kind"] in SESSION_KINDS:
            tally["failed_sessions"] += 1
        else:
            tally["failed_requests"] += 1
        if exchange["result"] == "failed":
            what = exchange["what"]
            tally["failures"][what] = tally["failures"].get(what, 0) + 1
            hangs += what in ("timeout", "write-timeout", "connect-timeout", "tls-timeout")

    # Every answer the upstream cut with a reset must have failed visibly at its client.
    resets = [e for e in upstream_events if e["event"] == "reset"]
    unseen_resets = [r for r in resets if (by_id.get(r["id"]) or {}).get("result") not in ("failed", "violation",
                                                                                            "hangup")]
    upload_violations = [e for e in upstream_events if e["event"] == "upload-violation"]
    classes = collections.Counter(v["violation"] for v in violations)
    classes["cut-complete"] += len(unseen_resets) + len(upload_violations)

    for fault in run["faults"]:
        if "t_inject" in fault:
            tally = per_fault[fault["index"]]
            tally["recovery_s"] = (fault["recovered"] - fault["restored"]) if fault.get("recovered") else None
            tally["down_s"] = fault["restored"] - fault["t_inject"]
            tally["outage_s"] = (fault["recovered"] - fault["t_inject"]) if fault.get("recovered") else None
            tally["violations"] += sum(1 for r in unseen_resets if r["id"] in fault.get("reset_ids", ()))
            if fault["kind"] == "reload":
                tally["new_certificate_after_s"] = new_certificate_after(events, fault)

    seconds = [e for e in events if e["event"] == "second"]
    totals = collections.Counter()
    for second in seconds:
        totals.update({k: v for k, v in second.items() if k in ("ok", "failed", "violation", "hangup")})
    return {
        "label": run["label"],
        "duration_s": run["end"] - run["t0"],
        "totals": dict(totals),
        "faults": [{**{k: v for k, v in fault.items() if k not in ("reset_ids",)}, **per_fault[fault["index"]]}
                   for fault in run["faults"]],
        "violations": {cls: classes.get(cls, 0) for cls in VIOLATION_CLASSES},
        "violation_examples": violations[:20] + [{"unseen reset": r} for r in unseen_resets[:10]]
        + [{"upstream": u} for u in upload_violations[:10]],
        "unexplained_failures": len(unexplained),
        "unexplained_examples": unexplained[:20],
        "unanswered_connects": len(unanswered),
        "unanswered_examples": unanswered[:10],
        "udp_drops": udp_drops(run["checkpoints"]),
        "hangs": hangs,
        "resets": {"done": len(resets), "not_seen_by_their_client": len(unseen_resets)},
        "cut_by_upstream_exit": len(excused),
        "all_recovered": all(fault.get("recovered") for fault in run["faults"] if "t_inject" in fault),
        "resources": resources(run["checkpoints"], rss_step_limit_mib, run.get("counts_tasks", False),
                               run.get("rss_is_the_proxy", True)),
        "metrics": metrics_agreement(run["checkpoints"]),
        "remnants": [r for r in run["restarts"] if r["remnants"]],
        "client_errors": [e for e in events if e["event"] == "client-error"][:20],
        "max_load1": max((sample["load1"] for sample in run["samples"]), default=0.0),
    }


def udp_drops(checkpoints: list[dict[str, Any]]) -> dict[str, int]:
    """UDP datagrams dropped for want of buffer between the first checkpoint and the last."""
    marks = [c["udp_drops"] for c in checkpoints if c.get("udp_drops")]
    if len(marks) < 2:
        return {}
    return {where: marks[-1][where] - marks[0][where] for where in marks[0]}


def new_certificate_after(events: list[dict[str, Any]], fault: dict[str, Any]) -> float | None:
    """Seconds from the reload until a client first saw the new certificate."""
    want = serial_number(fault["serial"])
    for event in events:
        if event["event"] == "serial" and event["t"] >= fault["t_inject"] and serial_number(event["serial"]) == want:
            return event["t"] - fault["t_inject"]
    return None


RSS_JUDGED_FROM = 16  # checkpoints in one life of the proxy (about half an hour of the long run)


def resources(checkpoints: list[dict[str, Any]], rss_step_limit_mib: float,
              counts_tasks: bool = True, judge_rss: bool = True) -> dict[str, Any]:
    """fds and tasks at every checkpoint against the first (the baseline, after warm-up);
    a candidate that `counts_tasks` must say how many at each.

    RSS within each life of the proxy process (a kill -9 starts a new one): a Python
    process keeps the memory of its busiest moment, so RSS steps up while the traffic mix
    reaches new peaks (a big upload meeting a big download), rarely once it has. A leak
    grows with every fault and every thousand requests instead. So in the second half of
    each life with at least `RSS_JUDGED_FROM` checkpoints, the median growth from one
    checkpoint to the next must stay within the limit. (A short run's lives are too short
    for that: a median of four steps is the noise of whichever transfer ran last.)"""
    if not checkpoints:
        return {"held": False, "why": "no checkpoint"}
    base = checkpoints[0]
    lives: dict[int, list[float]] = {}
    for checkpoint in checkpoints:
        if checkpoint["rss_kib"]:
            lives.setdefault(checkpoint["pid"], []).append(checkpoint["rss_kib"] / 1024)
    fds_off = [(c["after"], c["fds"], _extra_kinds(base.get("fd_kinds", {}), c.get("fd_kinds", {})))
               for c in checkpoints if c["fds"] != base["fds"]]
    tasks_off = [(c["after"], c["tasks"]) for c in checkpoints
                 if c["tasks"] != base["tasks"] or (counts_tasks and c["tasks"] is None)]
    steps = []
    for rss in lives.values() if judge_rss else ():
        if len(rss) >= RSS_JUDGED_FROM:
            later = rss[len(rss) // 2 - 1:]
            steps.append(statistics.median(b - a for a, b in zip(later, later[1:])))
    return {
        "baseline": {"fds": base["fds"], "tasks": base["tasks"], "rss_mib": round((base["rss_kib"] or 0) / 1024, 1)},
        "end": {"fds": checkpoints[-1]["fds"], "tasks": checkpoints[-1]["tasks"],
                "rss_mib": round((checkpoints[-1]["rss_kib"] or 0) / 1024, 1)},
        "fds_off_baseline": fds_off,
        "tasks_off_baseline": tasks_off,
        "rss_per_checkpoint_mib": [round((c["rss_kib"] or 0) / 1024, 1) for c in checkpoints],
        "tailscaled_rss_per_checkpoint_mib": [round((c.get("tailscaled_rss_kib") or 0) / 1024, 1)
                                              for c in checkpoints if c.get("tailscaled_rss_kib")],
        "rss_median_step_mib": [round(step, 2) for step in steps],
        "rss_judged": bool(steps),
        "rss_is_the_proxy": judge_rss,
        "lives": len(lives),
        "held": not fds_off and not tasks_off and all(step <= rss_step_limit_mib for step in steps),
        "rss_step_limit_mib": rss_step_limit_mib,
    }


def _extra_kinds(base: dict[str, int], now: dict[str, int]) -> dict[str, int]:
    """The kinds of fd a checkpoint has more (or fewer, negative) of than the baseline."""
    return {kind: now.get(kind, 0) - base.get(kind, 0) for kind in sorted(set(base) | set(now))
            if now.get(kind, 0) != base.get(kind, 0)}


def metrics_agreement(checkpoints: list[dict[str, Any]]) -> dict[str, Any]:
    """Between checkpoints (clients paused at both ends), the proxy's counters against the
    clients' counts: every request sent counted once, every websocket session counted, 2xx
    between the answers completed and the 2xx heads seen, and 5xx between the 5xx seen and
    those plus the exchanges that ended before an answer could be read (a client hanging up
    on an upload just as the proxy answers it 502)."""
    epochs = []
    for before, after in zip(checkpoints, checkpoints[1:]):
        if before["pid"] != after["pid"] or before["metrics"] is None or after["metrics"] is None:
            epochs.append({"after": after["after"], "compared": False, "why": "the proxy restarted"
                           if before["pid"] != after["pid"] else "metrics unreadable"})
            continue
        proxy = {key: after["metrics"][key] - before["metrics"].get(key, 0) for key in after["metrics"]}
        seen = after["client"]
        clients = {"total": seen.get("sent", 0), "5xx": seen.get("5xx", 0), "websockets": seen.get("1xx", 0),
                   "2xx ok": seen.get("ok-2xx", 0), "2xx seen": seen.get("2xx", 0),
                   "unanswered": seen.get("unanswered", 0)}
        agree = (proxy["total"] == clients["total"] and proxy["websockets"] == clients["websockets"]
                 and clients["5xx"] <= proxy["5xx"] <= clients["5xx"] + clients["unanswered"]
                 and clients["2xx ok"] <= proxy["2xx"] <= clients["2xx seen"])
        epochs.append({"after": after["after"], "compared": True, "exact": after["after"] in EXACT_EPOCHS,
                       "agree": agree, "proxy": proxy, "clients": clients})
    exact = [e for e in epochs if e.get("exact")]
    return {"epochs": epochs, "exact_compared": len(exact), "exact_disagree": sum(not e["agree"] for e in exact),
            "held": bool(exact) and all(e["agree"] for e in exact)}


def verdicts(result: dict[str, Any]) -> list[tuple[str, bool, str]]:
    """(invariant, held, the numbers)."""
    v = result["violations"]
    resources_ = result["resources"]
    metrics = result["metrics"]
    recoveries = [f["recovery_s"] for f in result["faults"] if f.get("recovery_s") is not None]
    return [
        ("no answer to the wrong request", v["wrong-answer"] == 0, f"{v['wrong-answer']} wrong answers"),
        ("no corrupted body or message", v["corrupt"] == 0, f"{v['corrupt']} corrupted"),
        ("no cut body the client could take as complete", v["cut-complete"] == 0,
         f"{v['cut-complete']} (resets {result['resets']['done']}, unseen by their client "
         f"{result['resets']['not_seen_by_their_client']})"),
        ("no message lost silently", v["lost"] == 0, f"{v['lost']} lost"),
        ("failures only in flight at a fault (all visible)", result["unexplained_failures"] == 0,
         f"{result['unexplained_failures']} outside any fault; {result['hangs']} timeouts"),
        ("new connections answered outside faults", result["unanswered_connects"] == 0,
         f"{result['unanswered_connects']} TCP connects without a SYN-ACK in 10 s outside any fault "
         f"(UDP datagrams dropped for want of buffer: {result['udp_drops'] or 'not measured'})"),
        ("recovery from every fault", result["all_recovered"],
         f"longest {max(recoveries):.1f} s" if recoveries else "no fault"),
        ("fds, tasks and RSS back to baseline", resources_["held"],
         f"fds {resources_.get('baseline', {}).get('fds')}→{resources_.get('end', {}).get('fds')}, "
         f"tasks {resources_.get('baseline', {}).get('tasks')}→{resources_.get('end', {}).get('tasks')}, "
         "RSS " + (f"median step per checkpoint in the second half of each life "
                   f"{resources_.get('rss_median_step_mib') or f'not judged (no life of {RSS_JUDGED_FROM} checkpoints)'} MiB"
                   if resources_.get("rss_is_the_proxy", True) else
                   "not judged (the process is its netstack and Go heap too)")),
        ("metrics agree with the clients", metrics["held"],
         f"{metrics['exact_compared'] - metrics['exact_disagree']} of {metrics['exact_compared']} epochs"),
    ]
