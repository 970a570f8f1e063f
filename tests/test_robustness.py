"""Bad input, failing backends and interruptions: a clear message, the other backends run, nothing written is lost."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from harness import results
from harness.cli import main
from harness.runner import PROJECT_ROOT, CompareConfig, compare
from harness.status import Status


def plug(monkeypatch, **faults):
    monkeypatch.setenv("DLCOMPARE_PLUGINS", ",".join(f"{n}=tests.fault_backend:FAULT={f}" for n, f in faults.items()))


def rows_by_backend(record):
    out = {}
    for r in record["rows"]:
        out.setdefault(r["backend"], []).append(r)
    return out


def only_record(results_dir):
    (path,) = (results_dir / "raw").glob("*.json")
    return json.loads(path.read_text())


@pytest.mark.parametrize("fault, expected", [
    ("raise", "RuntimeError: CUDA error: an illegal memory access was encountered (planted)"),
    ("segfault", "killed by signal SIGSEGV"),
])
def test_a_crashing_backend_is_an_error_row_and_the_others_run(fault, expected, monkeypatch, results_dir):
    plug(monkeypatch, bad=fault)
    assert main(["compare", "--model", "mlp_431", "--backends", "bad,numpy", "--results-dir", str(results_dir),
                 "--no-timing"]) == 1
    rec = only_record(results_dir)
    by = rows_by_backend(rec)
    assert all(r["status"] == Status.ERROR and expected in r["reason"] for r in by["bad"])
    assert all(r["status"] == Status.PASS for r in by["numpy"])


def test_a_failure_in_a_later_run_keeps_the_earlier_runs_of_that_backend(monkeypatch):
    plug(monkeypatch, flaky="raise_on_large_batch")
    res = compare(CompareConfig(model="mlp_431", backends=["flaky"], timing=False))
    by_b = {r["batch_size"]: r for r in res["rows"]}
    assert by_b[1]["status"] == Status.PASS
    assert by_b[3]["status"] == Status.ERROR and "planted failure" in by_b[3]["reason"]


def test_a_hanging_backend_times_out(monkeypatch):
    plug(monkeypatch, slow="hang")
    t = time.perf_counter()
    res = compare(CompareConfig(model="mlp_431", backends=["slow", "numpy"], timing=False, timeout=8))
    assert time.perf_counter() - t < 60
    by = {}
    for r in res["rows"]:
        by.setdefault(r["backend"], []).append(r)
    assert all(r["status"] == Status.ERROR and "timeout: no result after 8 s" in r["reason"] for r in by["slow"])
    assert all(r["status"] == Status.PASS for r in by["numpy"])


def test_nan_is_diverged_with_step_and_tensor(monkeypatch):
    plug(monkeypatch, blowup="nan")
    res = compare(CompareConfig(model="mlp_431", backends=["blowup"], timing=False))
    for r in res["rows"]:
        assert r["status"] == Status.DIVERGED
        assert r["reason"].startswith("diverged at step 3 (tensor loss")


def test_a_missing_framework_is_skipped_with_the_pip_hint(monkeypatch):
    plug(monkeypatch, fancy="import")
    res = compare(CompareConfig(model="mlp_431", backends=["fancy", "numpy"], timing=False))
    fancy = [r for r in res["rows"] if r["backend"] == "fancy"]
    assert all(r["status"] == Status.SKIPPED and "not installed" in r["reason"] and "fancyframework" in r["reason"]
               for r in fancy)


def test_a_cuda_run_without_a_gpu_is_skipped_not_an_error():
    res = compare(CompareConfig(model="mlp_431", backends=["numpy"], devices=["cpu", "cuda"], timing=False))
    cuda = [r for r in res["rows"] if r["device"] == "cuda"]
    assert cuda and all(r["status"] == Status.SKIPPED and "no CUDA device" in r["reason"] for r in cuda)


def test_ctrl_c_saves_finished_rows_and_marks_the_partial_one(monkeypatch, results_dir):
    env = dict(os.environ, DLCOMPARE_PLUGINS="stuck=tests.fault_backend:FAULT=hang", PYTHONPATH=str(PROJECT_ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "harness", "compare", "--model", "mlp_431", "--backends",
                             "numpy,stuck", "--results-dir", str(results_dir), "--no-timing"],
                            cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            # a user's terminal: Ctrl-C is not ignored (a shell's background job inherits SIGINT
                            # ignored, and then Python raises no KeyboardInterrupt at all)
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen = ""
    deadline = time.time() + 240  # generous: the oracle, its variants and numpy run first on a possibly busy machine
    while "[2/2] stuck ..." not in seen and time.time() < deadline and proc.poll() is None:
        seen += proc.stderr.readline()
    assert "[2/2] stuck ..." in seen, f"the stuck backend never started; stderr so far:\n{seen}"
    time.sleep(2)  # let the stuck backend reach its hang
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=240)  # results, tables and plots are written after Ctrl-C: slow when busy
    assert proc.returncode == 130, err
    rec = only_record(results_dir)
    assert rec["interrupted"] is True
    by = rows_by_backend(rec)
    assert all(r["status"] == Status.PASS for r in by["numpy"])
    assert by["stuck"] and all(r["status"] == Status.INTERRUPTED for r in by["stuck"])


def test_unwritable_results_dir_is_reported_before_any_work(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    t = time.perf_counter()
    assert main(["compare", "--model", "mnist_cnn", "--backends", "numpy", "--results-dir", str(blocker)]) == 2
    assert time.perf_counter() - t < 5  # nothing ran
    assert "cannot write results" in capsys.readouterr().err


def test_results_are_never_overwritten(monkeypatch, results_dir):
    res = compare(CompareConfig(model="mlp_431", backends=["numpy"], steps=2, timing=False))
    ids = iter(["fixed-id", "fixed-id", "other-id"])
    monkeypatch.setattr(results, "new_run_id", lambda model: next(ids))
    j1, _ = results.write_run(res, results_dir)
    before = j1.read_bytes()
    j2, _ = results.write_run(res, results_dir)  # same id taken: a new one is drawn, nothing overwritten
    assert j1.name == "fixed-id.json" and j2.name == "other-id.json"
    assert j1.read_bytes() == before
    assert not list((results_dir / "raw").glob("*.tmp")) and not list((results_dir / "raw").glob(".*"))


def test_two_runs_at_once_do_not_clobber_each_other(results_dir):
    cmd = [sys.executable, "-m", "harness", "compare", "--model", "mlp_431", "--backends", "numpy", "--results-dir",
           str(results_dir), "--no-timing", "--steps", "3"]
    procs = [subprocess.Popen(cmd + ["--seed", str(s)], cwd=PROJECT_ROOT, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL) for s in (1, 2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    recs = [json.loads(p.read_text()) for p in (results_dir / "raw").glob("*.json")]
    assert sorted(r["seed"] for r in recs) == [1, 2]
    for r in recs:
        with np.load((results_dir / "raw" / r["run_id"]).with_suffix(".npz")) as f:
            assert "init/dense0/kernel" in f.files


def test_corrupt_data_file_names_file_and_expected_sha256(tmp_path, monkeypatch, capsys):
    from models import data

    bad = tmp_path / "pima-indians-diabetes.csv"
    bad.write_bytes(data.PIMA_CSV.read_bytes()[:-100])
    monkeypatch.setattr(data, "PIMA_CSV", bad)
    assert main(["compare", "--model", "pima_mlp", "--backends", "numpy", "--results-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and data.PIMA_SHA256 in err


def test_fetch_without_network_says_what_to_download_and_where(tmp_path, capsys):
    # port 9 on localhost: nothing listens there, the connection is refused at once
    assert main(["data", "fetch", "mnist", "--dest", str(tmp_path), "--base-url", "http://127.0.0.1:9/"]) == 2
    err = capsys.readouterr().err
    assert "train-images-idx3-ubyte.gz" in err and str(tmp_path) in err
