"""The timing protocol, the same for every backend: warm-up apart, device sync before every clock read, several
rounds, median and IQR.  Batches are already in memory (data loading is not timed).

Two functions are the protocol's parts, and every timer in the project uses them (``time_steps`` here, the
pytest-benchmark worker ``benchmarks/_bench_worker.py`` and ``harness sweep``), so that they all time the same thing:

* :func:`stage`: the stacked batches handed to ``model.to_device`` once, before any clock runs, where the backend has
  it (tensors on the model's device: host-to-device conversion is data loading, not the step);
* :func:`timed_call`: ``reps`` calls of ``model.train_steps(xs, ys)`` between two ``model.sync()``, read with
  ``time.perf_counter``; returns seconds.
"""

from __future__ import annotations

import resource
import sys
import time

import numpy as np


def peak_rss_mb() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / (1024 * 1024) if sys.platform == "darwin" else r / 1024


def stage(model, xs, ys) -> tuple:
    """``(xs, ys, staged)``: the batches as the timed calls receive them (on the model's device where it can)."""
    if hasattr(model, "to_device"):
        xs, ys = model.to_device(xs, ys)
        return xs, ys, True
    return xs, ys, False


def timed_call(model, xs, ys, reps: int = 1) -> float:
    """Seconds for ``reps`` calls of ``model.train_steps(xs, ys)``, the device synchronised before and after."""
    model.sync()
    t = time.perf_counter()
    for _ in range(reps):
        model.train_steps(xs, ys)
    model.sync()
    return time.perf_counter() - t


def gpu_peak_mb(model) -> float | None:
    """Peak device memory (MiB) of a model on CUDA, None on the CPU or where the backend cannot say."""
    f = getattr(model, "gpu_peak_mb", None)
    v = f() if f is not None else None
    return None if v is None else float(v)


def time_steps(model, xs, ys, rounds: int = 5, steps: int = 20, min_round_s: float = 0.05) -> dict:
    """Per-step wall time of ``model.train_steps`` over the stacked batches, ``rounds`` times after a warm-up.

    The warm-up call (caches, and any tracing or compilation the new shapes need) is timed and reported apart as
    ``warmup_s``.  Each timed round repeats the batches until it lasts at least ``min_round_s`` (and at least
    ``steps`` steps), so that clock resolution and scheduler jitter stay small against what is measured.
    """
    n, batch = len(xs), len(xs[0])
    xs, ys, staged = stage(model, xs, ys)  # batches already in memory on the device: conversion is not timed
    warmup = timed_call(model, xs, ys)
    once = timed_call(model, xs, ys)  # one more, to size the rounds
    reps = max(1, -(-steps // n), int(min_round_s / max(once, 1e-9)) + 1)
    wall, cpu = time.perf_counter(), time.process_time()
    per_step = [timed_call(model, xs, ys, reps) / (reps * n) for _ in range(rounds)]
    # CPU seconds of every thread of this process per wall second over the timed rounds: how many cores the step kept
    # busy (about 1 with one thread; XLA's pool, for one, is not pinned by the thread settings)
    busy = (time.process_time() - cpu) / max(time.perf_counter() - wall, 1e-9)
    q1, med, q3 = np.percentile(per_step, [25, 50, 75])
    out = {"median_s": float(med), "iqr_s": float(q3 - q1), "rounds": rounds, "steps_per_round": reps * n,
           "warmup_s": warmup, "samples_per_s": float(batch / med), "peak_rss_mb": peak_rss_mb(),
           "per_round_s": per_step, "data_on_device": staged, "cores_busy": busy}
    gpu = gpu_peak_mb(model)
    if gpu is not None:
        out["gpu_peak_mb"] = gpu
    return out
