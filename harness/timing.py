"""The timing protocol, the same for every backend: warm-up apart, device sync before every clock read, several
rounds, median and IQR.  Batches are already in memory (data loading is not timed)."""

from __future__ import annotations

import resource
import sys
import time

import numpy as np


def peak_rss_mb() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / (1024 * 1024) if sys.platform == "darwin" else r / 1024


def time_steps(model, xs, ys, rounds: int = 5, steps: int = 20) -> dict:
    """Per-step wall time of ``model.train_steps`` over ``steps`` batches, ``rounds`` times after one warm-up round."""
    n = len(xs)
    reps = max(1, steps // n)
    model.sync()
    t = time.perf_counter()
    model.train_steps(xs, ys)  # warm-up: tracing, compilation, caches
    model.sync()
    warmup = time.perf_counter() - t
    per_step = []
    for _ in range(rounds):
        model.sync()
        t = time.perf_counter()
        for _ in range(reps):
            model.train_steps(xs, ys)
        model.sync()
        per_step.append((time.perf_counter() - t) / (reps * n))
    q1, med, q3 = np.percentile(per_step, [25, 50, 75])
    return {"median_s": float(med), "iqr_s": float(q3 - q1), "rounds": rounds, "steps_per_round": reps * n,
            "warmup_s": warmup, "samples_per_s": float(len(xs[0]) / med), "peak_rss_mb": peak_rss_mb(),
            "per_round_s": per_step}
