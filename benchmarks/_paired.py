"""Paired mode of ``benchmarks/overhead.py``: the harness's backend ``Model`` and the plain loop in ONE process,
their rounds alternated, so that both sides see the same machine load at the same moments.

    python benchmarks/_paired.py BACKEND --model mnist_mlp --batch-size 1 --data FILE.npz [--rounds 30] [--threads 1]

(environment: ``harness.runner.subprocess_env(BACKEND, dtype, threads)``, as for the harness's own worker.)

Both sides get the same batches and initial weights (``--data``, written by ``overhead.py`` from the harness's job),
both train one untimed round first (the harness times a model that has already run its correctness steps), then one
warm-up round each, then ``--rounds`` timed rounds each, alternating which side goes first.  A harness round is what
``harness/timing.py`` times: ``model.sync(); model.train_steps(xs, ys); model.sync()`` with the batches staged by the
model's ``to_device`` before any clock is read (NumPy batches where a backend has no ``to_device``); a plain
round is the loop's own (``benchmarks/plain/<framework>_loop.py``, its batches already framework tensors).
Prints one JSON line: the per-step time of every round of each side.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE / "plain"))
sys.path.insert(0, str(ROOT))

PLAIN = {"numpy": "numpy_loop", "tf1": "tf1_loop", "tf2": "tf2_loop", "keras": "keras_loop", "keras-jax": "keras_loop",
         "keras-torch": "keras_loop", "torch": "torch_loop", "jax": "jax_loop"}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("backend", choices=sorted(PLAIN))
    ap.add_argument("--model", default="mnist_mlp")
    ap.add_argument("--batch-size", type=int, required=True)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--data", required=True)
    a = ap.parse_args()

    import numpy as np

    import backends
    from backends.base import BuildOptions, Unsupported
    from models import get_model

    loop = importlib.import_module(PLAIN[a.backend])
    from _protocol import make_batches

    plain_args = argparse.Namespace(model=a.model, batch_size=a.batch_size, dtype=a.dtype, steps=a.steps,
                                    rounds=a.rounds, feed="tensor", seed=0, data=a.data, pretrain=1,
                                    threads=a.threads, device="cpu", adam="optim")
    xs, ys, weights = make_batches(plain_args)

    spec = get_model(a.model).with_overrides(dtype=a.dtype)
    try:
        model = backends.load(a.backend).Model(spec, [w.copy() for w in weights],
                                               BuildOptions(dtype=a.dtype, threads=a.threads))
    except Unsupported as e:  # a named skip, as the harness makes it
        print(json.dumps({"error": f"skipped: {e}"}), flush=True)
        return 0
    plain_round, plain_sync, _ = loop.setup(plain_args, xs, ys, weights)

    hx, hy = model.to_device(xs, ys) if hasattr(model, "to_device") else (xs, ys)  # as harness/timing.py does

    def harness_round():
        return model.train_steps(hx, hy)

    sides = {"harness": (harness_round, model.sync), "plain": (plain_round, plain_sync)}
    first = {name: np.asarray(f(), np.float64).tolist() for name, (f, _) in sides.items()}  # the untimed round
    per_step: dict[str, list[float]] = {"harness": [], "plain": []}

    def timed(name):
        f, sync = sides[name]
        sync()
        t = time.perf_counter()
        f()
        sync()
        return (time.perf_counter() - t) / a.steps

    warmup = {name: timed(name) for name in sides}
    for i in range(a.rounds):
        for name in (("harness", "plain") if i % 2 == 0 else ("plain", "harness")):
            per_step[name].append(timed(name))
    print(json.dumps({"backend": a.backend, "model": a.model, "batch_size": a.batch_size, "dtype": a.dtype,
                      "threads": a.threads, "steps": a.steps, "warmup_s": warmup, "per_step_s": per_step,
                      "first_losses": first}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
