"""End to end through the CLI entry point (which spawns the backend subprocesses), on the NumPy backend."""

import json

import numpy as np
import pytest

from harness.cli import main


def run_cli(*args):
    return main([str(a) for a in args])


def test_compare_mlp_431_numpy_passes_and_writes_json_and_npz(results_dir, capsys):
    assert run_cli("compare", "--model", "mlp_431", "--backends", "numpy", "--results-dir", results_dir) == 0
    out = capsys.readouterr().out
    raw = results_dir / "raw"
    (json_path,) = raw.glob("*.json")
    (npz_path,) = raw.glob("*.npz")
    rec = json.loads(json_path.read_text())
    rows = {r["batch_size"]: r for r in rec["rows"]}
    assert set(rows) == {1, 3} and all(r["status"] == "pass" for r in rows.values())
    assert "pass" in out
    for key in ("versions", "machine", "config", "seed", "data_source", "commit", "flags"):
        assert key in rec
    assert len(rows[1]["losses"]) == 20
    with np.load(npz_path) as f:
        assert "init/dense0/kernel" in f.files
        assert f["batch_order/1"].shape == (20, 1) and f["batch_order/3"].shape == (20, 3)
        assert f["numpy|float64|aligned|cpu|b3/losses"].shape == (20,)
        assert f["numpy|float64|aligned|cpu|b3/final/dense1/bias"].shape == (1,)
    # the 4-3-1 tutorial order is fixed (no shuffle): batch 1 visits samples 0, 1, 2, 0, 1, 2, ...
    with np.load(npz_path) as f:
        assert f["batch_order/1"].ravel()[:6].tolist() == [0, 1, 2, 0, 1, 2]


def test_report_regenerates_tables_from_raw(results_dir, capsys):
    run_cli("compare", "--model", "mlp_431", "--backends", "numpy", "--results-dir", results_dir, "--no-timing")
    run_cli("compare", "--model", "mlp_431", "--backends", "numpy", "--dtype", "float32", "--results-dir", results_dir,
            "--no-timing")
    assert run_cli("report", "--results-dir", results_dir) == 0
    md = (results_dir / "mlp_431.md").read_text()
    assert md.startswith("<!-- generated")
    assert md.count("| numpy ") >= 4  # float64 and float32 rows at batch 1 and 3, merged from two runs
    assert "tf1` (not run)" in md  # backends with no row are named, never dropped silently


def test_list_shows_models_and_backends(capsys):
    assert run_cli("list") == 0
    out = capsys.readouterr().out
    assert "mnist_cnn" in out and "225,034" in out and "numpy" in out and "installed" in out


@pytest.mark.parametrize("args, expected", [
    (["--model", "resnet"], "valid models: mlp_431"),
    (["--model", "mlp_431", "--backends", "mxnet"], "valid backends: numpy"),
    (["--model", "mlp_431", "--dtype", "float16"], "valid dtypes: float32, float64"),
    (["--model", "mlp_431", "--device", "tpu"], "valid devices: cpu, cuda, all"),
    (["--model", "mlp_431", "--batch-sizes", "1,x"], "comma-separated positive integers"),
    (["--model", "mlp_431", "--batch-sizes", "0"], "comma-separated positive integers"),
    (["--model", "mlp_431", "--steps", "0"], "--steps must be at least 1"),
    (["--model", "mlp_431", "--batch-sizes", "5"], "larger than the data set (3 samples)"),
    (["--model", "mlp_431", "--dataset", "imagenet"], "valid datasets"),
    (["--model", "mlp_431", "--mode", "fast"], "valid modes"),
])
def test_bad_compare_input_exits_2_with_the_valid_choices(args, expected, results_dir, capsys):
    extra = [] if "--backends" in args else ["--backends", "numpy"]
    assert run_cli("compare", *args, *extra, "--results-dir", results_dir) == 2
    assert expected in capsys.readouterr().err
    assert not list((results_dir / "raw").glob("*.json")) if (results_dir / "raw").exists() else True


def test_negative_epochs_exit_2(capsys):
    assert run_cli("train", "--model", "pima_mlp", "--epochs", "-1") == 2
    assert "--epochs must be at least 1" in capsys.readouterr().err


def test_missing_framework_is_a_skipped_row(results_dir, capsys, monkeypatch):
    import backends

    monkeypatch.setattr(backends, "missing_requirements", lambda name: ["torch"] if name == "torch" else [])
    assert run_cli("compare", "--model", "mlp_431", "--backends", "numpy,torch", "--results-dir", results_dir,
                   "--no-timing") == 0
    rec = json.loads(next((results_dir / "raw").glob("*.json")).read_text())
    torch_rows = [r for r in rec["rows"] if r["backend"] == "torch"]
    assert torch_rows and all(r["status"] == "skipped" for r in torch_rows)
    assert "pip install '.[torch]'" in torch_rows[0]["reason"]
