"""`python -m zsbir.report` on fabricated run folders with known metrics: rows, means, stds, n, published numbers."""
from __future__ import annotations

import csv
import io
import json
import os
import statistics
from pathlib import Path
from types import SimpleNamespace

import pytest

from zsbir import report


def fake_run(root: Path, name: str, method: str, dataset: str, seed: int, test: dict, protocol: str = "voc",
             mtime: float | None = None) -> Path:
    run_dir = root / name
    run_dir.mkdir(parents=True)
    path = run_dir / "metrics.json"
    path.write_text(json.dumps({
        "method": method, "dataset": dataset, "model": "m", "seed": seed, "protocol": protocol,
        "per_class": False, "metrics_order": list(test), "test": {**test, "n_queries": 10, "n_gallery": 20},
    }))
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return run_dir


@pytest.fixture
def runs_dir(tmp_path) -> Path:
    """sake: 3 seeds on Sketchy split 1, 2 on split 2; dsn: 2 seeds on TU-Berlin; sketch_lvm: 1 seed, plain protocol."""
    root = tmp_path / "outputs"
    for seed, (m, p) in enumerate([(0.50, 0.60), (0.52, 0.62), (0.54, 0.67)], start=1):
        fake_run(root / "multirun/a", f"{seed}_sake_sketchy", "sake", "sketchy", seed,
                 {"map_all": m, "prec_100": p, "map_200": 0.9, "prec_200": 0.9})
    for seed, (m, p) in enumerate([(0.40, 0.50), (0.44, 0.56)], start=1):
        fake_run(root / "multirun/b", f"{seed}_sake_split2", "sake", "sketchy_split2", seed,
                 {"map_all": 0.1, "prec_100": 0.1, "map_200": m, "prec_200": p})
    for seed, (m, p) in enumerate([(0.30, 0.40), (0.34, 0.40)], start=1):
        fake_run(root / "runs/tuberlin", f"dsn_{seed}", "dsn", "tuberlin", seed,
                 {"map_all": m, "prec_100": p, "map_200": 0.9, "prec_200": 0.9})
    fake_run(root / "runs/split2", "lvm", "sketch_lvm", "sketchy_split2", 1,
             {"map_all": 0.6, "prec_100": 0.6, "map_200": 0.70, "prec_200": 0.71}, protocol="plain")
    return root


def markdown_rows(text: str) -> dict[str, list[str]]:
    """Table rows of a markdown report, keyed by their first cell (the header row included)."""
    rows = {}
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows


def test_markdown_report_has_one_row_per_method_with_mean_std_n_and_published_numbers(runs_dir):
    text, notes = report.make_report([runs_dir], fmt="md")
    rows = markdown_rows(text)
    header = rows["method"]
    assert header == [
        "Sketchy Ext (split 1, 25 unseen) mAP@all", "paper", "Sketchy Ext (split 1, 25 unseen) P@100", "paper",
        "Sketchy Ext (split 2, 21 unseen) mAP@200", "paper", "Sketchy Ext (split 2, 21 unseen) P@200", "paper",
        "TU-Berlin Ext mAP@all", "paper", "TU-Berlin Ext P@100", "paper"]
    assert set(rows) == {"method", "SAKE", "DSN", "Sketch_LVM [plain]"}
    # SAKE: Sketchy-25 from its own paper ([1]), Sketchy-21 from the ZSE-SBIR table ([2]); no TU-Berlin runs.
    sake = rows["SAKE"]
    assert sake[:4] == ["0.520 ± 0.020 (n=3)", "0.547 [1]", "0.630 ± 0.036 (n=3)", "0.692 [1]"]
    assert sake[4:8] == ["0.420 ± 0.028 (n=2)", "0.497 [2]", "0.530 ± 0.042 (n=2)", "0.598 [2]"]
    assert sake[8:] == ["–", "0.475 [1]", "–", "0.599 [1]"]
    assert rows["DSN"] == ["–", "0.583 [2]", "–", "0.704 [2]", "–", "–", "–", "–",
                           "0.320 ± 0.028 (n=2)", "0.484 [2]", "0.400 ± 0.000 (n=2)", "0.591 [2]"]
    lvm = rows["Sketch_LVM [plain]"]
    assert lvm[4:8] == ["0.700 (n=1)", "0.723 [3]", "0.710 (n=1)", "0.725 [3]"]  # one seed: no ± shown
    assert "[1] Liu et al., Semantic-Aware Knowledge Preservation" in text
    assert "[3] Sain et al., CLIP for All Things" in text
    assert ("metric protocol (docs/metrics.md): unmarked rows: voc = VOC-interpolated AP, as SAKE, DSN and ZSE-SBIR "
            "compute it; rows marked [plain]: plain = non-interpolated AP") in text
    assert "Sketch_LVM [plain]: Sketch_LVM's released evaluation uses the plain protocol" in text
    assert notes == []


def test_csv_report_has_exact_means_stds_counts_and_published_numbers(runs_dir):
    text, _ = report.make_report([runs_dir], fmt="csv")
    rows = {row["method"]: row for row in csv.DictReader(io.StringIO(text))}
    assert list(rows) == ["sake", "dsn", "sketch_lvm"]  # the data file's method order (the papers' chronology)
    sake = rows["sake"]
    assert float(sake["sketchy/map_all/mean"]) == pytest.approx(0.52)
    assert float(sake["sketchy/map_all/std"]) == pytest.approx(statistics.stdev([0.50, 0.52, 0.54]))
    assert float(sake["sketchy/prec_100/std"]) == pytest.approx(statistics.stdev([0.60, 0.62, 0.67]), abs=1e-6)
    assert sake["sketchy/map_all/n"] == "3" and float(sake["sketchy/map_all/paper"]) == 0.547
    assert float(sake["sketchy_split2/map_200/mean"]) == pytest.approx(0.42)
    assert sake["tuberlin/map_all/mean"] == "" and sake["tuberlin/map_all/n"] == "0"
    assert float(sake["tuberlin/map_all/paper"]) == 0.475
    assert sake["protocol"] == "voc" and "Liu et al." in sake["paper_sources"] and "Lin et al." in sake["paper_sources"]
    lvm = rows["sketch_lvm"]
    assert lvm["protocol"] == "plain" and lvm["sketchy_split2/map_200/std"] == "" and lvm["sketchy_split2/map_200/n"] == "1"
    assert "sketchy_split2/map_all/mean" not in lvm  # Sketchy split 2 papers report mAP@200 and P@200 only


def test_latex_report_rows(runs_dir):
    text, _ = report.make_report([runs_dir], fmt="latex")
    assert r"\begin{tabular}{l|cccc|cccc|cccc}" in text and r"\multicolumn{4}{c}{TU-Berlin Ext}" in text
    sake = next(line for line in text.splitlines() if line.startswith("SAKE &"))
    cells = [c.strip() for c in sake.removesuffix(r"\\").split("&")]
    assert cells[1:5] == [r"$0.520 \pm 0.020$ \scriptsize{(3)}", r"0.547\textsuperscript{1}",
                          r"$0.630 \pm 0.036$ \scriptsize{(3)}", r"0.692\textsuperscript{1}"]
    assert cells[9] == "--" and cells[10] == r"0.475\textsuperscript{1}"
    assert any(line.startswith(r"Sketch\_LVM [plain] & --") for line in text.splitlines())
    assert text.count(r"\\") >= 5 and text.rstrip().splitlines()[-1].startswith("% [3] Sain et al.")


def test_paper_layouts_show_their_columns_and_their_own_published_numbers(runs_dir):
    text, _ = report.make_report([runs_dir], fmt="md", layout="sketch_lvm_table1")
    rows = markdown_rows(text)
    assert "Sketch_LVM Table 1 layout" in text
    assert rows["method"][0::2] == ["Sketchy Ext (split 2, 21 unseen) mAP@200", "Sketchy Ext (split 2, 21 unseen) P@200",
                                   "TU-Berlin Ext mAP@all", "TU-Berlin Ext P@100",
                                   "QuickDraw Ext mAP@all", "QuickDraw Ext P@200"]
    assert rows["SAKE"][:4] == ["0.420 ± 0.028 (n=2)", "0.497 [1]", "0.530 ± 0.042 (n=2)", "0.598 [1]"]
    assert rows["SAKE"][8:] == ["–", "–", "–", "–"]  # this table has no SAKE QuickDraw number
    assert rows["DSN"][5] == "–"  # DSN is not in Sketch_LVM's table
    assert rows["Sketch_LVM [plain]"][:2] == ["0.700 (n=1)", "0.723 [1]"]

    text, _ = report.make_report([runs_dir], fmt="md", layout="zse_sbir")
    rows = markdown_rows(text)
    assert rows["method"][0] == "TU-Berlin Ext mAP@all" and rows["SAKE"][-4:] == ["–", "0.130 [1]", "–", "0.179 [1]"]
    assert "Sketch_LVM [plain]" in rows and rows["Sketch_LVM [plain]"][1] == "–"


def test_reruns_of_one_seed_count_once_and_failed_runs_are_listed(tmp_path):
    root = tmp_path / "outputs"
    fake_run(root, "old", "dann", "synthetic", 1, {"map_all": 0.1, "prec_100": 0.2}, mtime=1_000_000)
    fake_run(root, "new", "dann", "synthetic", 1, {"map_all": 0.3, "prec_100": 0.4}, mtime=2_000_000)
    fake_run(root, "seed2", "dann", "synthetic", 2, {"map_all": 0.5, "prec_100": float("nan")}, mtime=1_500_000)
    (root / "crashed").mkdir()
    (root / "crashed" / "FAILED").write_text("RuntimeError: CUDA out of memory\n\ntraceback")
    text, notes = report.make_report([root], fmt="md")
    rows = markdown_rows(text)
    # Synthetic has no papers: its columns are the runs' own metrics, in their order.
    assert rows["method"] == ["Synthetic mAP@all", "paper", "Synthetic P@100", "paper"]
    assert rows["DANN baseline (triplet + GRL)"] == ["0.400 ± 0.141 (n=2)", "–", "0.400 (n=1)", "–"]
    assert any("crashed: RuntimeError: CUDA out of memory" in n for n in notes)
    assert any("dann/synthetic seed 1: using" in n and n.split("using ")[1].startswith(str(root / "new")) for n in notes)


def test_wandb_runs_are_read_from_config_and_summary(tmp_path):
    def wandb_run(run_id, seed, map_all, state_summary=True):
        summary = {"test/map_all": map_all, "test/prec_100": 0.5, "test/n_queries": 10, "_timestamp": 1.0 + seed}
        return SimpleNamespace(id=run_id, config={"method": "dsn", "dataset": "tuberlin", "seed": seed,
                                                  "protocol": "voc", "per_class": False},
                               summary=summary if state_summary else {})

    class FakeApi:
        def runs(self, path, filters):
            assert path == "me/zsbir" and filters == {"state": "finished"}
            return [wandb_run("a", 1, 0.30), wandb_run("b", 2, 0.40), wandb_run("c", 3, 0.9, state_summary=False)]

    fake_run(tmp_path, "local", "dsn", "tuberlin", 3, {"map_all": 0.50, "prec_100": 0.5})
    text, _ = report.make_report([tmp_path], wandb_project="me/zsbir", fmt="csv", api=FakeApi())
    dsn = next(csv.DictReader(io.StringIO(text)))
    assert dsn["tuberlin/map_all/n"] == "3" and float(dsn["tuberlin/map_all/mean"]) == pytest.approx(0.40)


def test_wandb_unreachable_is_a_clear_error():
    class DownApi:
        def runs(self, path, filters):
            raise ConnectionError("api.wandb.ai unreachable")

    with pytest.raises(report.ReportError, match="cannot list the runs of W&B project 'me/zsbir'.*check the entity/project"):
        report.make_report([], wandb_project="me/zsbir", api=DownApi())


def test_cli_messages_for_nothing_to_report(tmp_path, capsys):
    assert report.main([str(tmp_path)]) == 1
    assert "no finished runs (metrics.json) found in" in capsys.readouterr().err
    assert report.main([str(tmp_path / "missing")]) == 1
    assert "does not exist" in capsys.readouterr().err
    fake_run(tmp_path, "r", "sake", "synthetic", 1, {"map_all": 0.5})
    assert report.main([str(tmp_path), "--layout", "zse_sbir"]) == 1
    assert "no finished runs for quickdraw, sketchy, sketchy_split2, tuberlin" in capsys.readouterr().err
    assert report.main([str(tmp_path), "--format", "csv"]) == 0
    assert capsys.readouterr().out.startswith("method,protocol,per_class,synthetic/map_all/mean")


def test_published_numbers_match_the_shared_transcription():
    """Every number in the data file appears in the same row of the same table of docs/published_results.md."""
    doc = Path(__file__).resolve().parents[2] / "shared" / "docs" / "published_results.md"
    if not doc.is_file():
        pytest.skip(f"{doc} is not available")
    sections = {s.split("\n", 1)[0]: s for s in doc.read_text().split("\n## ")}
    heading = {"sketch_lvm_table1": "Sketch_LVM Table 1", "zse_sbir": "ZSE-SBIR project page", "sake": "SAKE (own paper)",
               "ma_zs_sbir": "Later methods and other protocols"}
    data = report.published_data()
    checked = 0
    for key, table in data["tables"].items():
        if key == "gzs_sketchy_split2":  # quoted in the text: "SpLIP reports Sketchy-21 mAP@200 / P@200 0.682 / 0.745"
            section = next(text for title, text in sections.items() if title.startswith("Later methods"))
            for row_name, by_dataset in table["rows"].items():
                values = by_dataset["sketchy_split2"]
                assert (f"{row_name} reports Sketchy-21 mAP@200 / P@200 {values['map_200']:.3f} / "
                        f"{values['prec_200']:.3f}") in section, row_name
                checked += 2
            continue
        if key == "fg_sketchy":  # quoted in the text, in percent: "Sketch_LVM 28.68 / 62.34"
            section = next(text for title, text in sections.items() if title.startswith("Later methods"))
            for row_name, by_dataset in table["rows"].items():
                acc = by_dataset["sketchy_fg"]
                assert f"{row_name} {100 * acc['acc_1']:.2f} / {100 * acc['acc_5']:.2f}" in section, row_name
                checked += 2
            continue
        section = next(text for title, text in sections.items() if title.startswith(heading[key]))
        lines = [line for line in section.splitlines() if line.startswith("| ")]
        for row_name, by_dataset in table["rows"].items():
            inner = row_name[row_name.find("(") + 1:-1] if row_name.endswith(")") else row_name
            line = next((l for l in lines if row_name in l), None) or next(l for l in lines if f"| {inner} |" in l)
            for metrics in by_dataset.values():
                for value in metrics.values():
                    assert f"{value:.3f}" in line, (key, row_name, value)
                    checked += 1
    assert checked == 50 + 40 + 8 + 6 + 8 + 2  # every number of the six tables (their "–" cells excluded)


def test_one_table_per_evaluation_protocol_with_its_own_means(tmp_path):
    root = tmp_path / "outputs"
    for seed, (zs, gzs, pbir) in enumerate([(0.50, 0.30, 0.70), (0.54, 0.34, 0.74)], start=1):
        run_dir = fake_run(root, f"sake_{seed}", "sake", "sketchy", seed, {"map_all": zs, "prec_100": 0.6})
        record = json.loads((run_dir / "metrics.json").read_text())
        record.update(protocols=["zs", "gzs", "pbir"],
                      gzs={"map_all": gzs, "prec_100": 0.2, "seen": {"map_all": 0.9}, "n_queries": 12},
                      pbir={"map_all": pbir, "prec_100": 0.8, "n_queries": 5})
        (run_dir / "metrics.json").write_text(json.dumps(record))
    fake_run(root, "dsn_1", "dsn", "sketchy", 1, {"map_all": 0.4, "prec_100": 0.5})  # zs only
    markdown, _ = report.make_report([root])
    titles = [line for line in markdown.splitlines() if line.startswith("### ")]
    assert titles == ["### zsbir results", "### zsbir results — generalized ZS-SBIR (gzs)",
                      "### zsbir results — photo-based image retrieval (pbir)"]
    text, _ = report.make_report([root], fmt="csv")
    rows = [r for r in csv.DictReader(io.StringIO(text)) if r["method"] in ("sake", "dsn")]
    by_protocol = {(r["eval_protocol"], r["method"]): r for r in rows}
    assert set(by_protocol) == {("zs", "sake"), ("zs", "dsn"), ("gzs", "sake"), ("pbir", "sake")}
    for name, expected in (("zs", 0.52), ("gzs", 0.32), ("pbir", 0.72)):
        assert float(by_protocol[(name, "sake")]["sketchy/map_all/mean"]) == pytest.approx(expected)
        assert by_protocol[(name, "sake")]["sketchy/map_all/n"] == "2"
    # published numbers are zs numbers: never beside the gzs or pbir means
    assert by_protocol[("zs", "sake")]["sketchy/map_all/paper"] != ""
    assert by_protocol[("gzs", "sake")]["sketchy/map_all/paper"] == by_protocol[("pbir", "sake")]["sketchy/map_all/paper"] == ""
