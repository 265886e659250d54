"""`python -m zsbir.bench seeds`: the training job over several seeds, summarised."""
from __future__ import annotations

import json

import pytest

from zsbir.bench import main
from zsbir.bench_seeds import SeedsError, parse_seeds, summarise


def test_parse_seeds_ranges_lists_and_errors():
    assert parse_seeds("0-9") == list(range(10))
    assert parse_seeds("3") == [3]
    assert parse_seeds("0-2,7,1") == [0, 1, 2, 7]
    with pytest.raises(SeedsError, match="not a list of seeds"):
        parse_seeds("zero")
    with pytest.raises(SeedsError, match="backwards"):
        parse_seeds("9-0")


def test_summary_has_each_seed_the_mean_std_and_worst_seed():
    rows = [{"seed": s, "value": v, "before": 0.09, "process_s": 100.0 + s, "train_s": 90.0, "best_step": 10, "reused": False}
            for s, v in [(0, 0.60), (1, 0.70), (2, 0.50)]]
    text = summarise(rows, "map_all")
    assert "mean 0.6000 ± 0.1000 (sample std, n=3)" in text
    assert "worst seed 2: 0.5000" in text
    assert "max 102 s" in text
    assert len(text.splitlines()) == 1 + 3 + 2


def test_seed_and_run_dir_overrides_are_refused(tmp_path):
    with pytest.raises(SeedsError, match="use --seeds and --out"):
        main(["seeds", "seed=3", "--seeds", "0", "--out", str(tmp_path)])


@pytest.mark.slow  # two training processes (~1 min on 2 cores)
def test_runs_each_seed_in_its_own_process_and_reuses_finished_runs(tmp_path, capsys, zsbir_cache):
    out = tmp_path / "seeds"
    args = ["seeds", "debug=smoke", "eval.grids.queries=0", "--seeds", "0,1", "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    values = {}
    for seed in (0, 1):
        metrics = json.loads((out / f"seed_{seed}" / "metrics.json").read_text())
        assert metrics["seed"] == seed
        values[seed] = metrics["test"]["map_all"]
        assert f"seed {seed}: {values[seed]:.4f} (" in printed
    assert values[0] != values[1], "two seeds gave the very same mAP: the seed did not reach the run"
    assert "(sample std, n=2)" in printed and (out / "summary.txt").read_text() in printed + "\n"
    # Again with the same --out: nothing is retrained, the summary is the same.
    stamp = (out / "seed_0" / "metrics.json").stat().st_mtime_ns
    assert main(args) == 0
    again = capsys.readouterr().out
    assert "seed 0:" in again and "(reused)" in again
    assert (out / "seed_0" / "metrics.json").stat().st_mtime_ns == stamp
    mean_line = [line for line in printed.splitlines() if line.startswith("map_all: mean")]
    assert mean_line and mean_line == [line for line in again.splitlines() if line.startswith("map_all: mean")]


def test_a_failing_seed_names_its_log(tmp_path):
    with pytest.raises(SeedsError, match=r"seed 0 failed .* its log: .*seed_0\.log"):
        main(["seeds", "debug=smoke", "trainer.no_such_key=1", "--seeds", "0", "--out", str(tmp_path)])
