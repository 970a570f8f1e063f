"""Results as data: ``harness.results.load_runs`` (one DataFrame row per measured row) and ``harness report --format
md|csv|json``; the markdown tables are rendered from the same flat columns."""

import io
import json

import pandas as pd
import pytest

from harness import cli, report
from harness.results import load_records, load_runs


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    d = tmp_path_factory.mktemp("results")
    assert cli.main(["compare", "--model", "mlp_431", "--backends", "numpy,torch", "--quick", "--results-dir",
                     str(d)]) == 0
    assert cli.main(["compare", "--model", "mlp_431", "--backends", "numpy", "--quick", "--dtype", "float32",
                     "--no-timing", "--results-dir", str(d)]) == 0
    assert cli.main(["sweep", "--backends", "numpy", "--batch-sizes", "1,2", "--rounds", "1", "--steps", "1",
                     "--results-dir", str(d)]) == 0
    return d


def test_load_runs_has_one_row_per_measured_row(results):
    runs = load_runs(results)
    recs = load_records(results)
    compare = [r for r in recs if r["kind"] == "compare"]
    assert len(runs[runs["kind"] == "compare"]) == sum(len(r["rows"]) for r in compare)
    assert len(runs[runs["kind"] == "sweep"]) == 2
    for col in ["run_id", "created_utc", "env", "commit", "cpu", "cores", "version", "backend", "dtype", "mode",
                "device", "batch", "status", "reason", "error_over_bound", "loss_err", "build_compile_s",
                "first_step_s", "median_s", "iqr_s", "samples_per_s", "peak_rss_mb"]:
        assert col in runs.columns, col
    timed = runs[(runs["kind"] == "compare") & runs["median_s"].notna()]
    assert set(timed["backend"]) == {"numpy", "torch"} and (timed["dtype"] == "float64").all()
    assert (timed["build_compile_s"] >= timed["first_step_s"]).all()
    assert set(runs[runs["kind"] == "compare"]["status"]) == {"pass"}
    sw = runs[runs["kind"] == "sweep"]
    assert (sw["flops"] > 0).all() and (sw["fraction_of_limit"] > 0).all()


def test_report_csv_and_json_are_the_frame(results, tmp_path, capsys):
    runs = load_runs(results)
    assert cli.main(["report", "--format", "csv", "--results-dir", str(results)]) == 0
    csv = pd.read_csv(io.StringIO(capsys.readouterr().out))
    assert list(csv.columns) == list(runs.columns) and len(csv) == len(runs)
    assert csv["median_s"].dropna().tolist() == pytest.approx(runs["median_s"].dropna().tolist())
    out = tmp_path / "runs.json"
    assert cli.main(["report", "--format", "json", "--model", "mlp_431", "--output", str(out), "--results-dir",
                     str(results)]) == 0
    rows = json.loads(out.read_text())
    assert len(rows) == len(runs[runs["model"] == "mlp_431"]) and {r["model"] for r in rows} == {"mlp_431"}


def test_report_format_bad_input(results, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["report", "--format", "xml", "--results-dir", str(results)])
    assert e.value.code == 2
    assert cli.main(["report", "--output", str(tmp_path / "x"), "--results-dir", str(results)]) == 2
    assert "--output goes with --format csv or json" in capsys.readouterr().err
    assert cli.main(["report", "--format", "csv", "--results-dir", str(tmp_path / "empty")]) == 1


def test_markdown_speed_table_is_rendered_from_the_frame(results):
    runs = load_runs(results)
    rec = [r for r in load_records(results) if r["kind"] == "compare" and r["config"]["timing"]][0]
    table, headers = report.speed_rows(rec["rows"])
    frame = runs[(runs["run_id"] == rec["run_id"]) & runs["median_s"].notna()]
    assert len(table) == len(frame)
    col = headers.index("x fastest (same run and node)")
    for row in table:
        sel = frame[(frame["backend"] == row[headers.index("backend")]) & (frame["batch"] == row[headers.index("batch")])]
        (median,) = sel["median_s"]
        fastest = frame[frame["batch"] == row[headers.index("batch")]]["median_s"].min()
        assert float(row[col]) == pytest.approx(median / fastest, abs=0.006)
        assert row[headers.index("build + compile s")] == f"{sel['build_compile_s'].iloc[0]:.3g}"
