"""`python -m zsbir.bench gpu`: the dry run end to end, and the runner's time caps, error capture and reports."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from zsbir.gpubench.plan import _row, _train_goals
from zsbir.gpubench.runner import DRY_RUN_VERDICT, Item, Section, run_sections

PROBES = "gpubench_probes"  # tests/gpubench_probes.py (tests/ is on sys.path under pytest)
SECTION_KEYS = ["0", "1", "2", "3", "4", "5", "6"]


def load(out: Path) -> tuple[dict, str]:
    return json.loads((out / "report.json").read_text()), (out / "report.md").read_text()


def test_dry_run_writes_both_reports_with_every_section(tmp_path, capsys):
    from zsbir.bench import main

    start = time.monotonic()
    assert main(["gpu", "--dry-run", "--out", str(tmp_path / "report"), "--work-dir", str(tmp_path / "work")]) == 0
    seconds = time.monotonic() - start
    report, markdown = load(tmp_path / "report")
    assert report["finished"] and report["dry_run"] and [s["key"] for s in report["sections"]] == SECTION_KEYS
    problems = {f"{s['key']}/{i['name']}": (i["status"], i.get("error") or i.get("reason"), i.get("log_tail"))
                for s in report["sections"] for i in s["items"] if i["status"] not in ("ok", "skipped")}
    assert not problems, problems
    assert seconds < 120, f"the dry run took {seconds:.0f} s; it must stay under 2 minutes"
    skipped = [i for s in report["sections"] for i in s["items"] if i["status"] == "skipped"]
    assert all(i["name"] == "zse_sbir" and "does not exist" in i["reason"] for i in skipped)
    # Every goal is stated with a value measured on CPU, and none is claimed by a dry run.
    goals = [g for s in report["sections"] for g in s["goals"]]
    assert len(goals) == 5 + 5  # sections 1-5 one each, section 6 one per encoder
    assert all(g["measured"] and g["verdict"] == DRY_RUN_VERDICT for g in goals), goals
    ddp = report["sections"][5]["items"][0]["records"]
    assert ddp["setup"]["ddp_wrapped"] and ddp["setup"]["backend"] == "gloo" and ddp["steps"]["weights_updated"]
    train = report["sections"][2]["items"][0]["records"]
    assert list(train) == ["plain fp32", "bf16 + fused optimizer", "bf16 + fused optimizer + compile"]
    for key in SECTION_KEYS:
        assert f"\n## {key}. " in markdown
    assert "| 2 | clip_prompt (ViT-B/32, batch 192, 224 px) speed options / plain fp32 | >= 3.0x |" in markdown
    assert "torch 2." in markdown and "device: CPU" in markdown
    assert "reports" in capsys.readouterr().out


def test_runner_keeps_going_after_an_error_and_a_timeout(tmp_path):
    out = tmp_path / "out"
    sections = [
        Section("a", "raises", [Item("raiser", f"{PROBES}:record_then_raise")]),
        Section("b", "hangs", [Item("hanger", f"{PROBES}:record_then_hang")]),
        Section("c", "skips", [Item("skipper", f"{PROBES}:skip"), Item("not run", f"{PROBES}:skip", skip="absent")]),
        Section("d", "reads the report", [Item("reader", f"{PROBES}:read_report", {"out": str(out)})]),
    ]
    report = run_sections(sections, out, tmp_path / "work", budget_s=24.0, header={"dry_run": True})
    assert report["seconds"] < 35  # the hanging item was stopped at its cap (~6 s), not after 120 s
    a, b, c, d = report["sections"]
    assert a["status"] == "failed" and a["items"][0]["error"] == "ValueError: broken on purpose"
    assert a["items"][0]["records"] == {"before the error": 1}  # what was measured before the error is kept
    assert "Traceback" in a["items"][0]["log_tail"]
    hung = b["items"][0]
    assert b["status"] == "timed out" and hung["status"] == "timed out" and "cap" in hung["error"]
    assert hung["seconds"] < 15 and set(hung["records"]["pids"]) == {"item", "helper"}
    for pid in hung["records"]["pids"].values():  # the item and the process it started are gone
        assert not alive(pid), pid
    assert [i["status"] for i in c["items"]] == ["skipped", "skipped"] and c["status"] == "skipped"
    assert c["items"][0]["reason"] == "does not apply here" and c["items"][1]["reason"] == "absent"
    # The report was on disk, with every section, while the last one ran.
    assert d["status"] == "ok"
    assert d["items"][0]["records"] == {"statuses": {"a": "failed", "b": "timed out", "c": "skipped", "d": "running"},
                                        "markdown written": True}
    saved, markdown = load(out)
    assert saved["finished"] and saved["sections"] == report["sections"]
    assert "ValueError: broken on purpose" in markdown and "timed out" in markdown


def test_sections_past_the_budget_are_recorded_as_not_run(tmp_path):
    def goal(report, entry):
        return [_row("a goal", "a target", None, None, entry["items"][0])]

    sections = [Section("a", "first", [Item("x", f"{PROBES}:skip")], goals=goal),
                Section("b", "second", [Item("y", f"{PROBES}:skip")])]
    report = run_sections(sections, tmp_path / "out", tmp_path / "work", budget_s=0.5, header={})
    assert [i["status"] for s in report["sections"] for i in s["items"]] == ["not run", "not run"]
    assert "budget spent" in report["sections"][0]["items"][0]["reason"]
    assert report["sections"][0]["goals"][0]["verdict"].startswith("not measured (not run: budget spent")


@pytest.mark.parametrize("fast, verdict", [(350.0, "met"), (250.0, "not met")])
def test_clip_prompt_goal_compares_the_fastest_variant_with_plain_fp32(fast, verdict):
    records = {"plain fp32": {"images_per_s": 100.0, "peak_mib": 900},
               "bf16 + fused optimizer": {"images_per_s": fast / 2, "peak_mib": 500},
               "bf16 + fused optimizer + compile": {"images_per_s": fast, "peak_mib": 450}}
    entry = {"items": [{"name": "clip_prompt", "status": "ok", "records": records}]}
    [row] = _train_goals({}, entry)
    assert row["verdict"] == verdict and row["target"] == ">= 3.0x"
    assert row["measured"].startswith(f"{fast / 100:.2f}x (bf16 + fused optimizer + compile: {fast} img/s")


def test_a_timed_out_item_without_figures_says_so_in_its_goal():
    entry = {"items": [{"name": "clip_prompt", "status": "timed out", "error": "killed at its cap of 60 s",
                        "records": {"plain fp32": {"images_per_s": 100.0, "peak_mib": 900}}}]}
    [row] = _train_goals({}, entry)
    assert row["measured"] is None and row["verdict"] == "not measured (timed out: killed at its cap of 60 s)"


def test_budget_must_be_positive():
    from zsbir.bench import main

    with pytest.raises(SystemExit, match="--budget-s must be positive"):
        main(["gpu", "--dry-run", "--budget-s", "0"])


def alive(pid: int) -> bool:
    """Running (not gone, not a zombie waiting for a reaper that a container may lack)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")
