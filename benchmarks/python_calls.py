"""Why the NumPy oracle's step is slower than the plain NumPy loop at batch 1: Python calls per training step.

    python benchmarks/python_calls.py --model mnist_cnn        (run with OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1)

Both sides train on the harness's own batches from its initial weights, in this one process: the harness's backend
``Model`` (``backends/numpy_scratch.py``: a generic forward / backward over the spec's layer tables, with the rounding
hooks the agreement engine uses) and ``benchmarks/plain/numpy_loop.py`` (the network written out by hand).  Prints the
function calls per step counted by ``cProfile`` and the median per-step time of each side (alternated rounds).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import sys
import time
import types
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE / "plain")]

import numpy_loop  # noqa: E402

from backends import numpy_scratch  # noqa: E402
from backends.base import BuildOptions  # noqa: E402
from harness import runner  # noqa: E402
from models import get_model, init_weights  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mnist_cnn", choices=("mnist_mlp", "mnist_cnn"))
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=15)
    a = ap.parse_args(argv)
    spec = get_model(a.model)
    cfg = runner.CompareConfig(model=a.model, backends=["numpy"], batch_sizes=[a.batch_size], steps=a.steps,
                               dtype="float32")
    job = runner.prepare(cfg, runner.validate(cfg))
    idx = job.order(a.batch_size)[: a.steps]
    xs, ys = job.data["x"][idx].astype("float32"), job.data["y"][idx]
    weights = init_weights(spec, 0)
    model = numpy_scratch.Model(spec, weights, BuildOptions(dtype="float32", threads=1))
    plain_round, _, _ = numpy_loop.setup(types.SimpleNamespace(model=a.model, dtype="float32", seed=0), xs, ys,
                                         [w.astype("float32") for w in weights])
    sides = {"harness": lambda: model.train_steps(xs, ys), "plain": plain_round}
    for f in sides.values():
        f()  # warm-up
    times = {k: [] for k in sides}
    for _ in range(a.rounds):
        for name, f in sides.items():
            t = time.perf_counter()
            f()
            times[name].append((time.perf_counter() - t) / a.steps)
    for name, f in sides.items():
        pr = cProfile.Profile()
        pr.enable()
        f()
        pr.disable()
        calls = pstats.Stats(pr).total_calls / a.steps
        print(f"{name:8s} {a.model} batch {a.batch_size}: {calls:6.0f} Python calls per step, "
              f"{statistics.median(times[name]) * 1e3:.3f} ms per step (median of {a.rounds} rounds)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
