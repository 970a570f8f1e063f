"""The timing protocol (harness/timing.py) and the timers that must time exactly what it times: the pytest-benchmark
worker (benchmarks/_bench_worker.py) and ``harness sweep``'s worker."""

import json
import re
import subprocess
import sys

import numpy as np
import pytest

from backends.base import BuildOptions
from harness import runner, timing
from models import get_model, init_weights

ROOT = runner.PROJECT_ROOT


def _pattern(log: list[str]) -> str:
    return " ".join({"to_device": "D", "sync": "s", "train staged": "T", "train raw": "R"}[x] for x in log)


def _model(tmp_path, monkeypatch):
    log = tmp_path / "log.txt"
    monkeypatch.setenv("TIMING_LOG", str(log))
    from tests import timing_backend

    spec = get_model("mlp_431")
    return timing_backend.Model(spec, init_weights(spec, 0), BuildOptions(dtype="float64")), log


def test_time_steps_stages_once_and_times_only_staged_calls(tmp_path, monkeypatch):
    model, log = _model(tmp_path, monkeypatch)
    xs, ys = np.zeros((3, 1, 4)), np.zeros((3, 1, 1))
    out = timing.time_steps(model, xs, ys, rounds=3, steps=3, min_round_s=0)
    p = _pattern(log.read_text().split("\n")[:-1])
    # staged once, then warm-up, sizing call and 3 rounds: each a sync, train calls, a sync; never a raw batch
    assert re.fullmatch(r"D( s( T)+ s){5}", p), p
    assert out["data_on_device"] is True and out["rounds"] == 3 and "gpu_peak_mb" not in out


def test_gpu_peak_column_only_where_the_backend_reports_one():
    class Cpu:
        def gpu_peak_mb(self):
            return None

    class Cuda:
        def gpu_peak_mb(self):
            return 12.5

    assert timing.gpu_peak_mb(object()) is None and timing.gpu_peak_mb(Cpu()) is None
    assert timing.gpu_peak_mb(Cuda()) == 12.5


def test_bench_worker_times_what_time_steps_times(tmp_path, monkeypatch):
    """The pytest-benchmark worker stages the batches as time_steps does (to_device once, untimed) and each of its
    rounds is the same sync / train_steps / sync on the staged batches."""
    log = tmp_path / "log.txt"
    monkeypatch.setenv("DLCOMPARE_PLUGINS", f"rec=tests.timing_backend:TIMING_LOG={log}")
    env = runner.subprocess_env("rec", "float64", 1)
    cmds = [{"cmd": "build", "model": "mlp_431", "batch_size": 1, "steps": 3, "dtype": "float64", "threads": 1,
             "seed": 0}, {"cmd": "round"}, {"cmd": "round"}, {"cmd": "quit"}]
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "_bench_worker.py"), "rec"], env=env, cwd=ROOT,
                         input="".join(json.dumps(c) + "\n" for c in cmds), capture_output=True, text=True, timeout=120)
    replies = [json.loads(line) for line in out.stdout.splitlines()]
    assert replies[0].get("ok") and replies[0]["data_on_device"] is True, (replies, out.stderr[-2000:])
    assert all(r.get("ok") and r["finite"] and r["worker_s"] > 0 for r in replies[1:]), replies
    # build's own sync(s) come first; then to_device once and, per round, sync, one train call, sync
    p = _pattern(log.read_text().split("\n")[:-1])
    assert re.fullmatch(r"(s )*D s T s s T s", p), p


@pytest.mark.parametrize("backend", ["numpy"])
def test_time_steps_on_a_real_backend(backend):
    from backends import numpy_scratch

    spec = get_model("mlp_431")
    model = numpy_scratch.Model(spec, init_weights(spec, 0), BuildOptions(dtype="float64"))
    xs = np.random.default_rng(0).normal(size=(2, 3, 4))
    ys = np.random.default_rng(1).uniform(size=(2, 3, 1))
    out = timing.time_steps(model, xs, ys, rounds=3, steps=4, min_round_s=0.001)
    assert out["median_s"] > 0 and out["iqr_s"] >= 0 and len(out["per_round_s"]) == 3
    assert out["samples_per_s"] == pytest.approx(3 / out["median_s"])
    assert out["steps_per_round"] >= 4 and out["data_on_device"] is False
