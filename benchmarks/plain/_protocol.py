"""What the six plain loops share: their command line, their random data and the timing protocol (stdlib + NumPy).

Nothing here knows about a framework or about the harness: each ``*_loop.py`` passes in a function that runs one
round (every in-memory batch once, returning the round's losses as host values) and a function that blocks until
the device is idle.  The protocol is the harness's (``harness/timing.py``), so that the two can be compared:

* the batches are made before anything is timed (``--feed tensor``: already framework tensors on the device);
* ``--pretrain K`` untimed rounds first, so that the weights are as far into training as the harness's are when it
  starts timing (the harness times a model that has already run its ``--steps`` correctness steps);
* one warm-up round (tracing, compilation, caches), timed apart and reported as ``warmup_s``;
* ``--rounds`` timed rounds of ``--steps`` steps each, with a device sync before every clock read (the round's
  losses are fetched to the host inside the round: that is the "fetch the result" sync of TF and NumPy);
* per-step time of a round = round time / steps; ``median_s`` and ``iqr_s`` over the rounds.

``--feed numpy`` keeps the batches as NumPy arrays and converts each one inside the timed step, the way the harness
feeds a backend (``Model.train_steps`` gets NumPy arrays): running both tells how much of a gap is conversion.

Data: ``--data random`` (default) makes random batches of the right shapes and each loop initialises its weights the
way its framework's tutorials do.  ``--data FILE.npz`` (``xs`` (steps, B, *input_shape), ``ys`` (steps, B), ``w0``,
``w1``, ... canonical float64 weights: dense ``(in, out)``, conv HWIO) takes the batches and the initial weights from
the file; ``benchmarks/overhead.py`` writes the harness's own there.  That matters for a 10% question: on the MNIST MLP
(normal(0, 1) init) real MNIST digits give subnormal float32 gradients that make the same backward matmuls 2-3x slower
on this CPU than random data does (measured: NumPy backward 2.5 ms vs 1.2 ms at batch 100).  With the same data and
weights the first round's losses (``first_losses``) can also be checked against the harness's: the same numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

MODELS = {"mnist_mlp": (784,), "mnist_cnn": (28, 28, 1)}  # input shape of one sample; 10 classes for both
N_CLASSES = 10

# Adam as the harness's MNIST specs have it (float32-representable values), eps-hat convention:
#   alpha_t = lr * sqrt(1 - b2^t) / (1 - b1^t);  w -= alpha_t * m / (sqrt(v) + eps)
LR = float(np.float32(1e-3))
BETA1 = float(np.float32(0.9))
BETA2 = float(np.float32(0.999))
EPS = {"mnist_mlp": float(np.float32(1e-8)), "mnist_cnn": float(np.float32(1e-7))}


def parse_args(backend: str, extra=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=f"plain {backend} training loop of an MNIST model, timed like the harness")
    p.add_argument("--model", choices=sorted(MODELS), default="mnist_mlp")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--steps", type=int, default=20, help="batches in memory = steps per timed round (default 20)")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds after the warm-up round (default 5)")
    p.add_argument("--feed", choices=("tensor", "numpy"), default="tensor",
                   help="tensor: batches are framework tensors before timing (default); numpy: converted per step")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default="random", help="'random' (default) or an .npz with xs, ys, w0, w1, ...")
    p.add_argument("--pretrain", type=int, default=0, help="untimed training rounds before the warm-up round")
    p.add_argument("--threads", type=int, default=None,
                   help="intra-op threads, set the way the harness's backend sets them (default: the framework's)")
    if extra is not None:
        extra(p)
    args = p.parse_args()
    if args.pretrain < 0:
        p.error(f"--pretrain must be at least 0, got {args.pretrain}")
    for name in ("batch_size", "steps", "rounds"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    return args


def make_batches(args) -> tuple[np.ndarray, np.ndarray, list[np.ndarray] | None]:
    """``steps`` batches, xs (steps, B, *input_shape) of ``dtype`` and ys (steps, B) int64 labels, and the initial
    weights in canonical layout (None for ``--data random``: the loop initialises its own)."""
    shape = (args.steps, args.batch_size) + MODELS[args.model]
    if args.data == "random":
        rng = np.random.default_rng(args.seed)
        xs = rng.random(shape).astype(args.dtype)
        ys = rng.integers(0, N_CLASSES, size=shape[:2], dtype=np.int64)
        return xs, ys, None
    with np.load(args.data) as f:
        xs, ys = f["xs"], f["ys"]
        weights = [f[f"w{j}"] for j in range(sum(k.startswith("w") for k in f.files))]
    if xs.shape[0] < args.steps or xs.shape[1:] != shape[1:] or ys.shape[:2] != (xs.shape[0], shape[1]):
        raise SystemExit(f"{args.data}: batches of shape {xs.shape} / {ys.shape}, expected at least {shape}")
    return (np.ascontiguousarray(xs[: args.steps], dtype=args.dtype), np.ascontiguousarray(ys[: args.steps], np.int64),
            [np.asarray(w, np.float64) for w in weights])


def adam_alpha(t: int) -> float:
    """The eps-hat step size of step ``t`` (1-based), in double."""
    return LR * (1.0 - BETA2**t) ** 0.5 / (1.0 - BETA1**t)


def time_rounds(run_round, sync, rounds: int, steps: int, pretrain: int = 0) -> dict:
    """``pretrain`` untimed rounds, a warm-up round apart, then ``rounds`` timed rounds; sync before every clock read;
    median and IQR per step.  ``first_losses``: the losses of the very first round (from the initial weights)."""
    first = None
    for _ in range(pretrain):
        losses = run_round()
        first = losses if first is None else first
    sync()
    t = time.perf_counter()
    losses = run_round()
    sync()
    warmup = time.perf_counter() - t
    first = losses if first is None else first
    per_step = []
    for _ in range(rounds):
        sync()
        t = time.perf_counter()
        losses = run_round()
        sync()
        per_step.append((time.perf_counter() - t) / steps)
    losses = np.asarray(losses, dtype=np.float64)
    if not np.all(np.isfinite(losses)):
        raise FloatingPointError(f"non-finite loss in the last round: {losses}")
    q1, med, q3 = np.percentile(per_step, [25, 50, 75])
    return {"median_s": float(med), "iqr_s": float(q3 - q1), "warmup_s": warmup, "rounds": rounds,
            "steps_per_round": steps, "pretrain_rounds": pretrain, "per_round_s": per_step,
            "first_losses": [float(v) for v in np.asarray(first, np.float64)]}


def run(backend: str, args, setup) -> None:
    """A loop script's main: its batches, ``setup(args, xs, ys, weights) -> (run_round, sync, info)``, the protocol,
    the JSON line (``info()`` adds the loop's own facts, read after timing)."""
    xs, ys, weights = make_batches(args)
    run_round, sync, info = setup(args, xs, ys, weights)
    emit(backend, args, time_rounds(run_round, sync, args.rounds, args.steps, args.pretrain), **info())


def emit(backend: str, args, timing: dict, **extra) -> None:
    """The one JSON line on stdout that ``benchmarks/overhead.py`` reads."""
    line = {"backend": backend, "model": args.model, "batch_size": args.batch_size, "dtype": args.dtype,
            "feed": args.feed, "data": args.data, "threads": args.threads, **timing, **extra, "pid": os.getpid()}
    print(json.dumps(line), flush=True)
