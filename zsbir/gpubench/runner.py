"""Run sections of measurements under one wall-clock budget; never lose what was measured.

Each item (one measurement) runs in its own process (`worker.py`, forked from a server that
imported torch once) under a time cap, so a
slow compile, a hung collective or a crashed CUDA context costs only that item: the
process group is killed at the cap, the figures it recorded so far stay, and the run goes
on. The caps come from the budget: a section gets the remaining time in proportion to its
weight among the sections still to run, an item likewise within its section, so time a
fast part leaves unused flows to the later ones. Both reports are rewritten after every
item; sections not reached yet stay in them as "pending".
"""
from __future__ import annotations

import json
import multiprocessing
import os
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from zsbir.gpubench.report import write_reports
from zsbir.gpubench.worker import EXIT_SKIPPED, PRELOAD, child_main

MIN_ITEM_CAP_S = 1.0  # below this an item is not started (recorded as not run: budget spent)
DRY_RUN_VERDICT = "not measured (dry run: CPU, tiny sizes)"


@dataclass
class Item:
    """One measurement: `target` ("module:function") called as function(rec, **params)."""

    name: str
    target: str
    params: dict | Callable[[dict], dict] = field(default_factory=dict)  # a callable gets the report so far
    weight: float = 1.0
    env: dict[str, str] = field(default_factory=dict)
    skip: str | None = None  # reason not to run it at all (recorded as skipped)


@dataclass
class Section:
    key: str
    title: str
    items: list[Item]
    weight: float = 1.0
    # goals(report, section_report) -> [{"goal", "target", "measured", "verdict"}]; must cope with no records
    goals: Callable[[dict, dict], list[dict]] | None = None


def new_report(sections: list[Section], header: dict) -> dict:
    return {**header, "started": _now(), "updated": _now(), "finished": False,
            "sections": [{"key": s.key, "title": s.title, "status": "pending", "cap_s": None, "seconds": None,
                          "items": [{"name": i.name, "status": "pending", "records": {}} for i in s.items],
                          "goals": []} for s in sections]}


def run_sections(sections: list[Section], out_dir: Path, work_dir: Path, budget_s: float, header: dict,
                 torch_threads: int | None = None) -> dict:
    """Run every section in order within `budget_s` seconds (after the fork server's imports); returns the report.

    `torch_threads`: intra-op threads of each item (None: torch's default, one per core).
    """
    out_dir, work_dir = Path(out_dir), Path(work_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (work_dir / "jobs").mkdir(parents=True, exist_ok=True)
    report = new_report(sections, header)
    for section, entry in zip(sections, report["sections"]):
        entry["goals"] = _goals(section, report, entry)
    write_reports(report, out_dir)
    report["preload_s"] = round(start_fork_server(), 1)
    start = time.monotonic()
    try:
        with _terminate_as_exit():
            for index, (section, entry) in enumerate(zip(sections, report["sections"])):
                remaining = budget_s - (time.monotonic() - start)
                cap = max(0.0, remaining * section.weight / sum(s.weight for s in sections[index:]))
                _run_section(section, entry, cap, report, out_dir, work_dir, torch_threads)
                entry["goals"] = _goals(section, report, entry)
                report["updated"] = _now()
                write_reports(report, out_dir)
    except BaseException as stop:  # Ctrl-C, SIGTERM: say so in the report, then stop as asked
        report["interrupted"] = f"{type(stop).__name__} {stop}".strip()
        write_reports(report, out_dir)
        raise
    report["finished"] = True
    report["seconds"] = round(time.monotonic() - start, 1)
    write_reports(report, out_dir)
    return report


def _run_section(section: Section, entry: dict, cap: float, report: dict, out_dir: Path, work_dir: Path,
                 torch_threads: int | None) -> None:
    entry.update(status="running", cap_s=round(cap, 1))
    start = time.monotonic()
    for position, (item, item_entry) in enumerate(zip(section.items, entry["items"])):
        if item.skip is not None:
            item_entry.update(status="skipped", reason=item.skip)
            continue
        left = cap - (time.monotonic() - start)
        weights_left = sum(i.weight for i in section.items[position:] if i.skip is None)
        item_cap = max(0.0, left * item.weight / weights_left)
        if item_cap < MIN_ITEM_CAP_S:
            item_entry.update(status="not run", reason=f"budget spent (section cap {cap:.0f} s)")
            continue
        try:
            params = item.params(report) if callable(item.params) else item.params
        except Exception as err:  # noqa: BLE001 - a failure of one item must not stop the run
            item_entry.update(status="error", error=f"preparing its parameters: {type(err).__name__}: {err}")
            continue
        item_entry.update(status="running", cap_s=round(item_cap, 1))
        write_reports(report, out_dir)
        item_entry.update(run_item(f"{section.key}-{item.name}", item, params, item_cap, work_dir, torch_threads))
    entry["seconds"] = round(time.monotonic() - start, 1)
    entry["status"] = _section_status([i["status"] for i in entry["items"]])


def run_item(job_name: str, item: Item, params: dict, cap_s: float, work_dir: Path,
             torch_threads: int | None = None) -> dict:
    """Run one item in a new process group; kill the group at `cap_s`. Returns its report entry."""
    job_name = "".join(c if c.isalnum() or c in "-_." else "_" for c in job_name)
    job, records, log = (work_dir / "jobs" / f"{job_name}{suffix}" for suffix in (".json", ".records.jsonl", ".log"))
    records.unlink(missing_ok=True)
    job.write_text(json.dumps({"target": item.target, "params": params, "records": str(records),
                               "torch_threads": torch_threads}))
    start = time.monotonic()
    process = _fork_server().Process(target=child_main, args=(str(job), str(log), item.env), name=job_name)
    process.start()
    timed_out = False
    try:
        process.join(timeout=cap_s)
        timed_out = process.exitcode is None
    finally:
        if process.exitcode is None:  # over its cap, or the runner itself is being stopped
            _kill_group(process.pid)
            process.join()
    code = None if timed_out else process.exitcode
    seconds = round(time.monotonic() - start, 1)
    values, error, skipped, cpu_s = read_records(records)
    result = {"seconds": seconds, "cpu_s": cpu_s, "records": values, "log": str(log)}
    if code is None:
        result.update(status="timed out", error=f"killed at its cap of {cap_s:.0f} s; the figures recorded "
                                                f"before that are kept")
    elif code == EXIT_SKIPPED:
        result.update(status="skipped", reason=skipped)
    elif code != 0:
        result.update(status="error", error=error or f"the process exited with status {code} (see the log)",
                      log_tail=_tail(log))
    else:
        result["status"] = "ok"
    return result


def read_records(path: Path) -> tuple[dict, str | None, str | None, float | None]:
    """(records by name, error message, skip reason, CPU seconds) from a worker's records file."""
    values, error, skipped, cpu_s = {}, None, None, None
    if not Path(path).is_file():
        return values, error, skipped, cpu_s
    for line in Path(path).read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:  # a line cut off by the kill
            continue
        if "record" in entry:
            values[entry["record"]] = entry["value"]
        error = entry.get("error", error)
        skipped = entry.get("skipped", skipped)
        cpu_s = entry.get("cpu_s", cpu_s)
    return values, error, skipped, cpu_s


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)  # the item and anything it started (loader workers, compile pool)
    except ProcessLookupError:
        pass


@contextmanager
def _terminate_as_exit():
    """SIGTERM (a job limit, `kill`) unwinds like Ctrl-C, so the running item's process group is killed too."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _fork_server():
    """A multiprocessing context whose server has imported torch & co. once (worker.PRELOAD)."""
    global _CONTEXT
    if _CONTEXT is None:
        _CONTEXT = multiprocessing.get_context("forkserver")
        _CONTEXT.set_forkserver_preload(PRELOAD)
    return _CONTEXT


def start_fork_server() -> float:
    """Start the fork server and wait for its imports (outside the budget); returns the seconds it took."""
    start = time.monotonic()
    process = _fork_server().Process(target=os.getpid)  # any no-op: it starts once the server is ready
    process.start()
    process.join()
    return time.monotonic() - start


_CONTEXT = None


def _section_status(statuses: list[str]) -> str:
    done = [s for s in statuses if s != "skipped"]
    if not done:
        return "skipped"
    if all(s == "ok" for s in done):
        return "ok"
    if any(s == "ok" for s in done):
        return "partial"
    for common in ("timed out", "not run"):
        if all(s == common for s in done):
            return common
    return "failed"


def _goals(section: Section, report: dict, entry: dict) -> list[dict]:
    if section.goals is None:
        return []
    try:
        rows = section.goals(report, entry)
    except Exception as err:  # noqa: BLE001 - a goal that cannot be read is reported, not fatal
        return [{"goal": section.title, "target": "-", "measured": None,
                 "verdict": f"not measured (reading the figures failed: {type(err).__name__}: {err})"}]
    if report.get("dry_run"):
        for row in rows:
            if row["verdict"] in ("met", "not met"):
                row["verdict"] = DRY_RUN_VERDICT
    return rows


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
