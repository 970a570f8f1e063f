"""End to end through the CLI entry point (which spawns the backend subprocesses), on the NumPy backend."""

import json

import numpy as np
import pytest

from harness.cli import main
from harness.status import Status


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
    assert set(rows) == {1, 3} and all(r["status"] == Status.PASS for r in rows.values())
    assert Status.PASS in out
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
    assert "- `error`: the backend crashed" in md and "- `fail`: a disagreement" in md  # the legend of the verdicts


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
    assert torch_rows and all(r["status"] == Status.SKIPPED for r in torch_rows)
    assert "pip install '.[torch]'" in torch_rows[0]["reason"]


@pytest.fixture
def no_backend_work(monkeypatch):
    """Bad input must be refused before any subprocess (backend or oracle) starts."""
    import subprocess

    def refuse(*a, **k):
        raise AssertionError(f"a subprocess was started for bad input: {a[:1]}")

    monkeypatch.setattr(subprocess, "Popen", refuse)


@pytest.mark.parametrize("args, expected", [
    (["compare", "--seed", "-1"], ["--seed must be an integer with 0 <= seed < 2**32", "got -1", "--seed 0"]),
    (["compare", "--seed", str(2 ** 32)], ["0 <= seed < 2**32", f"got {2 ** 32}"]),
    (["compare", "--timeout", "-1"], ["--timeout must be a positive", "got -1", "leave it out for the default 900"]),
    (["compare", "--timeout", "0"], ["--timeout must be a positive", "got 0"]),
    (["compare", "--timeout", "nan"], ["--timeout must be a positive", "got nan"]),
    (["compare", "--threads", "-2"], ["--threads must be at least 1, got -2", "leave it out"]),
    (["compare", "--threads", "0"], ["--threads must be at least 1, got 0"]),
    (["train", "--seed", "-1"], ["--seed must be an integer with 0 <= seed < 2**32", "got -1"]),
    (["train", "--threads", "-2"], ["--threads must be at least 1, got -2"]),
    (["train", "--batch-size", "0"], ["--batch-size must be at least 1, got 0", "leave it out for the model's 10"]),
    (["train", "--batch-size", "-1"], ["--batch-size must be at least 1, got -1"]),
    (["train", "--epochs", "-3"], ["--epochs must be at least 1, got -3", "leave it out for the model's 150"]),
    (["train", "--epochs", "0"], ["--epochs must be at least 1, got 0"]),
], ids=lambda v: " ".join(v) if isinstance(v, list) and v[0] in ("compare", "train") else None)
def test_bad_numbers_exit_2_before_any_work(args, expected, no_backend_work, results_dir, capsys):
    cmd, *rest = args
    extra = ["--backends", "numpy", "--results-dir", results_dir] if cmd == "compare" else []
    assert run_cli(cmd, "--model", "pima_mlp", *rest, *extra) == 2
    err = capsys.readouterr().err
    assert err.startswith("harness: error: ")
    for text in expected:
        assert text in err, err
    assert not (results_dir / "raw").exists() or not list((results_dir / "raw").iterdir())


@pytest.mark.parametrize("args, expected", [
    (["--seeds", "0"], "--seeds must be at least 1, got 0"),
    (["--seeds", "-2"], "--seeds must be at least 1, got -2"),
    (["--bug-seeds", "0"], "--bug-seeds must be at least 1, got 0"),
    (["--steps", "5"], "selftest needs at least 12 steps"),
    (["--models", "mnist_mlp,nope"], "unknown model 'nope' in --models"),
    (["--backends", "nope"], "unknown backend 'nope'"),
])
def test_bad_selftest_input_exits_2_before_any_work(args, expected, no_backend_work, capsys):
    assert run_cli("selftest", *args) == 2
    assert expected in capsys.readouterr().err


def test_xla_flags_for_one_thread_are_well_formed(monkeypatch):
    import re

    from harness.runner import subprocess_env

    monkeypatch.delenv("XLA_FLAGS", raising=False)
    flags = subprocess_env("jax", "float32", 1)["XLA_FLAGS"].split()
    assert flags and all(re.fullmatch(r"--xla_[a-z0-9_]+=\S+", f) for f in flags), flags
    monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/x")  # the user's own flags are kept, in front
    assert subprocess_env("jax", "float32", 1)["XLA_FLAGS"].split() == ["--xla_dump_to=/tmp/x", *flags]


def test_xla_accepts_the_one_thread_flags(monkeypatch):
    """XLA aborts at start-up on a flag it does not know ("Unknown flag in XLA_FLAGS"): every flag we set must be real."""
    import subprocess
    import sys

    from harness.runner import PROJECT_ROOT, subprocess_env

    pytest.importorskip("jax")
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    env = {**subprocess_env("jax", "float32", 1), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", "import jax.numpy as jnp; print(float(jnp.ones(3).sum()))"], env=env,
                          cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "3.0", proc.stderr[-2000:]


def test_old_records_with_status_failed_read_as_error(results_dir):
    from harness.report import status_text
    from harness.results import load_records

    rec = {"schema": 1, "run_id": "old", "model": "mlp_431", "kind": "compare", "created_utc": "2026-01-01",
           "rows": [{"backend": "tf1", "status": "failed", "reason": "exit code 1"}, {"backend": "numpy", "status": "pass"}],
           "oracle": {"1": {"status": "missing", "reason": "the subprocess wrote no result for this run"}}}
    (results_dir / "raw").mkdir()
    (results_dir / "raw" / "old.json").write_text(json.dumps(rec))
    (loaded,) = load_records(results_dir)
    assert [r["status"] for r in loaded["rows"]] == [Status.ERROR, Status.PASS]
    assert loaded["oracle"]["1"]["status"] == Status.ERROR
    assert status_text(loaded["rows"][0]) == "error: exit code 1"


def test_a_users_model_file_runs_through_compare_and_report(results_dir, capsys):
    """Issue 12: `--model path/to/net.py` (examples/my_model.py: BatchNorm and dropout) works like a built-in model:
    the oracle's state is compared, the gradient invariance exemption is stated, and report names the model."""
    from pathlib import Path

    example = Path(__file__).resolve().parent.parent / "examples" / "my_model.py"
    assert run_cli("compare", "--model", example, "--backends", "numpy", "--steps", "12", "--no-timing",
                   "--results-dir", results_dir) == 0
    out = capsys.readouterr().out
    assert "state err" in out and "not checked: BatchNorm1: each sample is normalised with its batch" in out
    (json_path,) = (results_dir / "raw").glob("*.json")
    rec = json.loads(json_path.read_text())
    assert rec["model"] == "my_pima_bn" and rec["spec"]["state_names"] == ["bn1/moving_mean", "bn1/moving_variance"]
    assert all(r["status"] == Status.PASS for r in rec["rows"])
    assert all("state" in r["agreement"]["worst"] for r in rec["rows"])
    with np.load(json_path.with_suffix(".npz")) as f:
        assert f["numpy|float32|aligned|cpu|b16/final/bn1/moving_variance"].shape == (16,)
    assert run_cli("report", "--model", example, "--results-dir", results_dir) == 0
    md = (results_dir / "my_pima_bn.md").read_text()
    assert "BatchNorm and dropout" in md and "state err" in md
    assert run_cli("compare", "--model", example, "--batch-sizes", "1", "--results-dir", results_dir) == 2
    assert "too small for layer 1 (BatchNorm" in capsys.readouterr().err
