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


def time_steps(model, xs, ys, rounds: int = 5, steps: int = 20, min_round_s: float = 0.05) -> dict:
    """Per-step wall time of ``model.train_steps`` over the stacked batches, ``rounds`` times after a warm-up.

    The warm-up call (tracing, compilation, caches) is timed and reported apart.  Each timed round repeats the
    batches until it lasts at least ``min_round_s`` (and at least ``steps`` steps), so that clock resolution and
    scheduler jitter stay small against what is measured.
    """
    n, batch = len(xs), len(xs[0])
    staged = hasattr(model, "to_device")
    if staged:  # batches already in memory on the device: conversion is not timed
        xs, ys = model.to_device(xs, ys)
    model.sync()
    t = time.perf_counter()
    model.train_steps(xs, ys)  # warm-up
    model.sync()
    warmup = time.perf_counter() - t
    t = time.perf_counter()
    model.train_steps(xs, ys)  # one more, to size the rounds
    model.sync()
    once = time.perf_counter() - t
    reps = max(1, -(-steps // n), int(min_round_s / max(once, 1e-9)) + 1)
    per_step = []
    for _ in range(rounds):
        model.sync()
        t = time.perf_counter()
        for _ in range(reps):
            model.train_steps(xs, ys)
        model.sync()
        per_step.append((time.perf_counter() - t) / (reps * n))
    q1, med, q3 = np.percentile(per_step, [25, 50, 75])
    out = {"median_s": float(med), "iqr_s": float(q3 - q1), "rounds": rounds, "steps_per_round": reps * n,
           "warmup_s": warmup, "samples_per_s": float(batch / med), "peak_rss_mb": peak_rss_mb(),
           "per_round_s": per_step, "data_on_device": staged}
    if hasattr(model, "gpu_peak_mb"):
        out["gpu_peak_mb"] = model.gpu_peak_mb()
    return out
