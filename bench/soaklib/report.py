"""results.md (the per-fault table, ours and Go's side by side, and the invariants),
results.json (everything measured) and one plot per candidate, written to --out; or
the same from the results.json of runs made apart (`combine`), one hour at a time."""

from __future__ import annotations

import json
import os
import shutil
import statistics
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from .analysis import json_lines, verdicts
from .faults import FAULT_KINDS, WHAT, PlannedFault, Profile


def per_kind(result: dict[str, Any], kind: str) -> dict[str, Any]:
    runs = [f for f in result["faults"] if f["kind"] == kind]
    done = [f for f in runs if "t_inject" in f]
    recoveries = [f["recovery_s"] for f in done if f.get("recovery_s") is not None]
    return {
        "runs": len(done),
        "skipped": next((f["skipped"] for f in runs if "skipped" in f), None),
        "failed_requests": sum(f["failed_requests"] for f in done),
        "failed_sessions": sum(f["failed_sessions"] for f in done),
        "violations": sum(f["violations"] for f in done),
        "not_recovered": sum(1 for f in done if not f.get("recovered")),
        "recovery_median": statistics.median(recoveries) if recoveries else None,
        "recovery_max": max(recoveries) if recoveries else None,
        "down_max": max((f["down_s"] for f in done), default=None),
        "errors": [f["error"] for f in done if "error" in f],
    }


def cell(stats: dict[str, Any] | None) -> list[str]:
    if stats is None:
        return ["", "", ""]
    if stats["runs"] == 0:
        return ["n/a", "n/a", "n/a"]
    failed = f"{stats['failed_requests']} / {stats['failed_sessions']}"
    if stats["not_recovered"]:
        recovery = f"**not recovered** ({stats['not_recovered']})"
    elif stats["recovery_max"] is None:
        recovery = "?"
    elif stats["runs"] == 1:
        recovery = f"{stats['recovery_max']:.1f}"
    else:
        recovery = f"{stats['recovery_median']:.1f} / {stats['recovery_max']:.1f}"
    lost = str(stats["violations"]) if not stats["violations"] else f"**{stats['violations']}**"
    return [failed, recovery, lost]


def fault_table(results: list[dict[str, Any]]) -> list[str]:
    labels = [r["label"] for r in results]
    head = "| fault | runs | part down s |" + "".join(f" {label}: failed requests / sessions |"
                                                     f" {label}: first success s | {label}: lost |" for label in labels)
    lines = [head, "| --- | ---: | ---: |" + " ---: | ---: | ---: |" * len(labels)]
    notes = []
    for kind in FAULT_KINDS:
        stats = [per_kind(r, kind) for r in results]
        runs = max(s["runs"] for s in stats)
        if runs == 0 and not any(s["skipped"] for s in stats):
            continue
        down = max((s["down_max"] for s in stats if s["down_max"] is not None), default=None)
        row = (f"| {kind} | {runs} | {'' if down is None else f'{down:.1f}'} |"
               + "".join(" " + " | ".join(cell(s)) + " |" for s in stats))
        lines.append(row)
        for result, s in zip(results, stats):
            if s["skipped"]:
                notes.append(f"- {kind}, {result['label']}: n/a, {s['skipped']}.")
            for error in s["errors"]:
                notes.append(f"- {kind}, {result['label']}: the fault could not be injected: {error}.")
    return lines + [""] + notes


def invariant_table(results: list[dict[str, Any]]) -> list[str]:
    labels = [r["label"] for r in results]
    lines = ["| invariant |" + "".join(f" {label} |" for label in labels), "| --- |" + " --- |" * len(labels)]
    rows = [verdicts(r) for r in results]
    for index, (name, _held, _numbers) in enumerate(rows[0]):
        cells = []
        for row in rows:
            _name, held, numbers = row[index]
            cells.append(f" {'held' if held else '**VIOLATED**'}: {numbers} |")
        lines.append(f"| {name} |" + "".join(cells))
    return lines


def markdown(args: Any, profile: Profile, schedule: list[PlannedFault], results: list[dict[str, Any]],
             started: dict[str, str]) -> str:
    """`started`: when each candidate's run began (ISO 8601), by label."""
    mode = "short" if args.short else f"long, {args.duration:g} s planned"
    when = set(started.values())
    lines = [
        f"# Soak under faults ({mode})",
        "",
        (f"Run {when.pop()}" if len(when) == 1 else
         "Runs made apart: " + ", ".join(f"{label} {at}" for label, at in started.items()))
        + f", seed {args.seed}, "
        f"{len(schedule)} faults per candidate, transfers up to {profile.max_transfer / 1e6:g} MB; "
        + ", ".join(f"{r['label']} {r['duration_s'] / 60:.1f} min" for r in results) + ". "
        f"Ours ran with {' '.join(args.ours_flags)}, spawning {args.tailscale_bin_dir / 'tailscaled'}. "
        f"Supervisor RestartSec {args.restart_sec:g} s.",
        "",
        "## Per fault kind",
        "",
        "Part down: from the fault until the broken part was back (the upstream or headscale restarted, "
        "the client device Running again, the resets done; 0 for kills, whose recovery is the candidate's own). "
        "Failed: exchanges in flight at the fault that failed visibly (error status, reset, a cut the framing "
        "betrays, timeout): requests / websocket and event-stream sessions. First success: from the part being "
        "back to the first successful request on a new connection (median / max over runs). Lost: wrong "
        "answers, corrupted bodies, cuts taken as complete, messages missing without an error.",
        "",
        *fault_table(results),
        "",
        "## Invariants",
        "",
        *invariant_table(results),
        "",
    ]
    for result in results:
        lines += details(result)
    lines += ["## The faults", "", "| fault | what |", "| --- | --- |"]
    lines += [f"| {kind} | {WHAT[kind]} |" for kind in FAULT_KINDS]
    lines += ["", "Schedule: " + ", ".join(f"{f.kind} (after {f.gap:g} s)" for f in schedule), ""]
    return "\n".join(lines) + "\n"


def details(result: dict[str, Any]) -> list[str]:
    label = result["label"]
    totals = result["totals"]
    resources = result["resources"]
    lines = [f"## {label}", "",
             f"Exchanges: {totals.get('ok', 0)} ok, {totals.get('failed', 0)} failed, "
             f"{totals.get('violation', 0)} violations, {totals.get('hangup', 0)} abandoned by their client "
             f"on purpose. Load average up to {result['max_load1']:.1f} on {os.cpu_count()} CPUs.", ""]
    failures: dict[str, int] = {}
    for fault in result["faults"]:
        for what, count in fault.get("failures", {}).items():
            failures[what] = failures.get(what, 0) + count
    if failures:
        lines += ["How failures showed: " + ", ".join(f"{what} {count}" for what, count in
                                                        sorted(failures.items(), key=lambda kv: -kv[1])) + ".", ""]
    if result["cut_by_upstream_exit"]:
        lines += [f"Close-delimited answers cut by the upstream's own exit, which ends them with a FIN as if "
                  f"complete (no proxy can tell; not counted as violations): {result['cut_by_upstream_exit']}.", ""]
    reloads = [f.get("new_certificate_after_s") for f in result["faults"] if f["kind"] == "reload"]
    if reloads:
        lines += ["New certificate first seen by a client after the reload: "
                  + ", ".join("never" if r is None else f"{r:.1f} s" for r in reloads) + ".", ""]
    if resources.get("baseline"):
        lines += [f"Resources at checkpoints (clients paused, idle connections dropped): baseline "
                  f"{resources['baseline']}, end {resources['end']}, process lives {resources['lives']}; "
                  f"RSS at each checkpoint {resources['rss_per_checkpoint_mib']} MiB"
                  + (f" (its tailscaled: {resources['tailscaled_rss_per_checkpoint_mib']} MiB)"
                     if resources["tailscaled_rss_per_checkpoint_mib"] else "")
                  + (f", median step in the second half of each life {resources['rss_median_step_mib']} MiB "
                     f"(limit {resources['rss_step_limit_mib']:g})" if resources["rss_is_the_proxy"] else
                     ", not judged: the netstack and a garbage-collected heap share the process")
                  + f"; fds off baseline {resources['fds_off_baseline'] or 'never'}, "
                  f"tasks off baseline {resources['tasks_off_baseline'] or 'never'}.", ""]
    metrics = result["metrics"]
    off = [e for e in metrics["epochs"] if e.get("compared") and not e["agree"]]
    lines += [f"Metrics against the clients' counts: {metrics['exact_compared']} epochs expected exact, "
              f"{metrics['exact_disagree']} disagree." + (" Off (all epochs): " + "; ".join(
                  f"after {e['after']}: proxy {fmt_counts(e['proxy'])}, clients {fmt_counts(e['clients'])}"
                  for e in off) if off else ""), ""]
    if result["remnants"]:
        lines += ["Still running when the proxy had died (killed by the supervisor): "
                  + "; ".join(", ".join(r["remnants"]) for r in result["remnants"]) + ".", ""]
    for title, items in (("Violations", result["violation_examples"]),
                         ("Failures outside any fault", result["unexplained_examples"]),
                         ("Connects the node did not answer, outside any fault", result["unanswered_examples"]),
                         ("Client errors (bugs in the soak's clients)", result["client_errors"])):
        if items:
            lines += [f"{title} (first {len(items)}):", "", "```"]
            lines += [json.dumps(item) for item in items] + ["```", ""]
    return lines


def fmt_counts(counts: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in counts.items())


def series(run: dict[str, Any]) -> list[dict[str, Any]]:
    """Per-second totals of the clients' exchanges, time from the run's start."""
    seconds = [e for e in json_lines(run["client_events"]) if e["event"] == "second"]
    merged: dict[int, dict[str, int]] = {}
    for second in seconds:
        slot = merged.setdefault(second["t"], {"ok": 0, "failed": 0, "violation": 0, "hangup": 0})
        for key in slot:
            slot[key] += second.get(key, 0)
    if not merged:
        return []
    empty = {"ok": 0, "failed": 0, "violation": 0, "hangup": 0}  # a second without an exchange ending
    return [{"t": t - run["t0"], **merged.get(t, empty)} for t in range(min(merged), max(merged) + 1)]


def plot(run: dict[str, Any], per_second: list[dict[str, Any]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t0 = run["t0"]
    samples = run["samples"]
    figure, axes = plt.subplots(4, 1, figsize=(12, 10), sharex=True)
    xs = [s["t"] for s in per_second]
    axes[0].plot(xs, [s["ok"] for s in per_second], lw=0.8, color="#4c78a8")
    axes[0].set_ylabel("requests/s (ok)")
    axes[1].bar(xs, [s["failed"] for s in per_second], width=1.0, color="#e45756", label="failed")
    axes[1].bar(xs, [s["violation"] for s in per_second], width=1.0, color="black", label="violations")
    axes[1].set_ylabel("errors/s")
    axes[1].legend(loc="upper right", fontsize=7)
    times = [s["t"] - t0 for s in samples]
    axes[2].plot(times, [(s["rss_kib"] or float("nan")) / 1024 for s in samples], lw=0.8, color="#f58518",
                 label="proxy")
    axes[2].set_ylabel("the process's RSS (MiB)")
    if any(s.get("tailscaled_rss_kib") for s in samples):
        beside = axes[2].twinx()  # ten times the proxy's: on its own scale
        beside.plot(times, [(s["tailscaled_rss_kib"] or float("nan")) / 1024 for s in samples], lw=0.8,
                    color="#9e9e9e")
        beside.set_ylabel("its tailscaled's RSS (MiB, grey)")
    axes[3].plot(times, [s["fds"] if s["fds"] is not None else float("nan") for s in samples], lw=0.8,
                 color="#54a24b", label="open fds")
    if any(s.get("tasks") for s in samples):
        axes[3].plot(times, [s["tasks"] if s["tasks"] is not None else float("nan") for s in samples], lw=0.8,
                     color="#b279a2", label="asyncio tasks")
    axes[3].legend(loc="upper left", fontsize=7)
    axes[3].set_ylabel("count")
    axes[3].set_xlabel("seconds since the clients started")
    for fault in run["faults"]:
        if "t_inject" not in fault:
            continue
        start = fault["t_inject"] - t0
        end = (fault.get("recovered") or fault["restored"]) - t0
        for axis in axes:
            axis.axvspan(start, max(end, start + 0.5), color="#e45756", alpha=0.15, lw=0)
        axes[0].annotate(fault["kind"], (start, 1.0), xycoords=("data", "axes fraction"), rotation=90,
                         fontsize=6, va="top", ha="right")
    for checkpoint in run["checkpoints"]:
        for axis in axes:
            axis.axvline(checkpoint["t"] - t0, color="#cccccc", lw=0.5, zorder=0)
    figure.suptitle(f"{run['label']} under faults (shaded: from each fault to the first success after it)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write(args: Any, profile: Profile, schedule: list[PlannedFault], runs: list[dict[str, Any]],
          results: list[dict[str, Any]], started: float) -> None:
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started))
    document = {"seed": args.seed, "mode": "short" if args.short else "long", "duration_planned_s": args.duration,
                "ours_flags": args.ours_flags, "ours_tailscaled": str(args.tailscale_bin_dir / "tailscaled"),
                "restart_sec": args.restart_sec, "profile": profile.__dict__,
                "schedule": [f.__dict__ for f in schedule], "started": {run["label"]: at for run in runs},
                "runs": [], "results": [{**result, "verdicts": verdicts(result)} for result in results]}
    for run in runs:
        per_second = series(run)
        plot(run, per_second, out / f"plot-{run['label']}.png")
        document["runs"].append({key: value for key, value in run.items()
                                 if key not in ("client_events", "upstream_events")} | {"per_second": per_second})
    _write_documents(out, document)


# What must be the same in runs made apart for their tables to stand side by side.
SAME_IN_EVERY_RUN = ("seed", "mode", "duration_planned_s", "restart_sec", "profile", "schedule")


def combine(folders: list[Path], out: Path) -> None:
    """One results.md and results.json of the runs in `folders` (their results.json and
    plots), made apart on the same seed and schedule: an hour per candidate at a time."""
    missing = [str(folder) for folder in folders if not (folder / "results.json").is_file()]
    if missing:
        raise SystemExit(f"--combine: no results.json in {', '.join(missing)}; give the --out folders of "
                         "bench/soak runs")
    documents = [json.loads((folder / "results.json").read_text()) for folder in folders]
    first = documents[0]
    for folder, document in zip(folders[1:], documents[1:]):
        differ = [key for key in SAME_IN_EVERY_RUN if document.get(key) != first.get(key)]
        if differ:
            raise SystemExit(f"--combine: {folder} differs from {folders[0]} in {', '.join(differ)}: "
                             "only runs of the same seed, mode and duration stand side by side")
    labels = [run["label"] for document in documents for run in document["runs"]]
    if len(set(labels)) != len(labels):
        raise SystemExit(f"--combine: a candidate appears twice ({', '.join(labels)})")
    ours = next((d for d in documents if any(r["label"] == "tsnsrv" for r in d["runs"])), first)
    combined = {**first, "ours_flags": ours["ours_flags"], "ours_tailscaled": ours["ours_tailscaled"],
                "started": {}, "runs": [], "results": []}
    out.mkdir(parents=True, exist_ok=True)
    for folder, document in zip(folders, documents):
        combined["started"] |= document.get("started") or {r["label"]: "?" for r in document["runs"]}
        combined["runs"] += document["runs"]
        combined["results"] += document["results"]
        for run in document["runs"]:
            plot_file = folder / f"plot-{run['label']}.png"
            if plot_file.is_file() and plot_file.resolve() != (out / plot_file.name).resolve():
                shutil.copyfile(plot_file, out / plot_file.name)
    _write_documents(out, combined)


def _write_documents(out: Path, document: dict[str, Any]) -> None:
    args = SimpleNamespace(short=document["mode"] == "short", duration=document["duration_planned_s"],
                           seed=document["seed"], ours_flags=document["ours_flags"],
                           tailscale_bin_dir=Path(document["ours_tailscaled"]).parent,
                           restart_sec=document["restart_sec"])
    schedule = [PlannedFault(**fault) for fault in document["schedule"]]
    # One line: an hour of samples indented would pass 2 MiB.
    (out / "results.json").write_text(json.dumps(document, separators=(",", ":"), default=str) + "\n")
    (out / "results.md").write_text(markdown(args, Profile(**document["profile"]), schedule,
                                             document["results"], document["started"]))
