"""pytest-benchmark suite: each backend's train step, per model and batch size, as the harness drives it.

    pytest benchmarks/ --benchmark-only --benchmark-json=out.json          # every backend x MNIST MLP, CNN x batch 1, N
    pytest benchmarks/ --benchmark-only -m "not slow"                     # without the CNN at batch N (the slow half)
    pytest benchmarks/ --benchmark-only --bench-backends torch,jax --bench-models mnist_mlp --bench-rounds 10

Design (why a subprocess per backend, and what exactly is timed):

* Every backend runs in a worker process of its own (``_bench_worker.py``), started with the environment the harness
  gives that backend's worker (``harness.runner.subprocess_env``), so that its framework is imported there and nowhere
  else.  This is not forced by TF1: ``backends/tf1_graph.py`` builds its own ``tf.Graph`` and ``Session`` and never
  calls ``disable_eager_execution()``, so it could share a process with ``tf2``.  It is forced by the others: Keras'
  backend is fixed per process (``KERAS_BACKEND``: ``keras``, ``keras-jax`` and ``keras-torch`` cannot share one),
  ``jax_enable_x64`` is per process, and the thread pools of TF, torch and XLA would compete for the 2 cores if they
  lived side by side.  The pytest process imports no framework.
* What is timed is what ``harness/timing.py`` times, in the backend's own process: ``model.train_steps(xs, ys)`` on
  ``--bench-steps`` in-memory batches, staged on the model's device once and untimed (``harness.timing.stage``),
  between two ``model.sync()``, read with ``time.perf_counter`` in the worker: the worker calls the harness's own
  ``harness.timing.stage`` and ``timed_call`` (``tests/test_timing.py`` checks the call sequence of both).  That
  worker-side duration is fed to pytest-benchmark through its public
  per-test ``timer`` option (``@pytest.mark.benchmark(timer=WORKER_CLOCK)``): :data:`WORKER_CLOCK` is a clock that
  advances by exactly the duration the worker measured, once per round.  One benchmark round is one command to the
  worker, handed to ``benchmark.pedantic(..., iterations=steps)``: pytest-benchmark reads its timer, calls the target
  ``steps`` times (the first call runs the whole round in the worker, the other ``steps - 1`` return at once, see
  :class:`RoundInWorker`), reads its timer again and divides by ``steps``.  So every statistic in the table and the
  JSON is *per train step*, with one device sync per round, exactly as the harness reports it.
* Why not this process's wall clock: it would add the pipe round trip and, on a loaded machine, the scheduler's
  latency in waking this process (measured here: ~0.3 ms per round on a quiet machine, up to ~8 ms per round with
  other jobs running), which is no part of the backend's cost.  ``extra_info["parent_wall_per_step_s"]`` keeps that
  clock too, for the same rounds.
* Threads: ``--bench-threads 1`` by default, set the way ``harness compare --threads 1`` sets them (thread variables
  in the worker's environment, the backend's own setting in ``BuildOptions``).  On a shared 2-core machine a 2-thread
  BLAS / OpenMP pool that spin-waits for a core another job holds makes steps 10-50x slower at random (NumPy MLP at
  batch 100 measured here: 29-92 ms a step with 2 threads, ~3 ms with 1); ``--bench-threads 0`` keeps each framework's
  default.  XLA's CPU pool (jax, keras-jax) is sized at start-up and is not pinned by either, as in the harness.
* Warm-up rounds (``--bench-warmup``, default 1: tracing, compilation, caches) run through the same path, untimed.
* Data: the harness's own MNIST batches and initial weights (seed 0), as ``harness compare`` times them.  On the MNIST
  MLP that matters: its normal(0, 1) init on real digits gives subnormal float32 gradients that make the same matmuls
  slower than random data would (see ``benchmarks/README.md``).
* A backend whose framework is missing is a named skip (``backends.missing_requirements``, which looks the modules up
  without importing them: ``pytest.importorskip`` would import every framework into this one process, the thing the
  design avoids); one that cannot run a configuration (``Unsupported``, e.g. Keras on torch in float64) is a named skip
  from its worker.
* The CNN at batch N is marked ``slow`` (about half of the suite's time on 2 cores): ``-m "not slow"`` drops it.
"""

from __future__ import annotations

import statistics
import time

import pytest

import backends
from models import get_model


class WorkerClock:
    """pytest-benchmark's timer for these tests: the worker's ``perf_counter``, as a clock that advances by the
    duration the worker measured for each round (sync, ``train_steps``, sync), and stands still otherwise."""

    __name__ = "worker_perf_counter"  # how pytest-benchmark names the timer in its JSON

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


WORKER_CLOCK = WorkerClock()


class RoundInWorker:
    """The benchmark target: its first call of every ``steps`` calls runs one round of ``steps`` train steps in the
    worker, waits for it and advances :data:`WORKER_CLOCK` by the worker's measurement; the other calls of the round
    return at once.  ``budget`` rounds at most (warm-up + timed), so that pytest-benchmark's extra call after its timed
    loops runs nothing."""

    def __init__(self, worker, steps: int, budget: int):
        self.worker, self.steps, self.budget = worker, steps, budget
        self.calls = 0
        self.worker_s: list[float] = []
        self.parent_s: list[float] = []
        self.finite = True

    def __call__(self) -> None:
        first_of_round = self.calls % self.steps == 0
        self.calls += 1
        if not first_of_round or len(self.worker_s) >= self.budget:
            return
        t = time.perf_counter()
        r = self.worker.request({"cmd": "round"})
        self.parent_s.append(time.perf_counter() - t)
        if "error" in r:
            raise RuntimeError(f"train_steps failed in the worker:\n{r['error']}")
        WORKER_CLOCK.now += r["worker_s"]
        self.worker_s.append(r["worker_s"])
        self.finite = self.finite and r["finite"]


@pytest.mark.benchmark(timer=WORKER_CLOCK)
def test_train_step(benchmark, case, workers, bench_options):
    backend, model, batch = case
    missing = backends.missing_requirements(backend)
    if missing:
        pytest.skip(f"{backend}: not installed ({', '.join(missing)}): {backends.install_hint(backend)}")
    o = bench_options
    dtype = o["dtype"] or get_model(model).dtype
    worker = workers.get(backend, dtype, o["threads"], o["timeout"])
    built = worker.request({"cmd": "build", "model": model, "batch_size": batch, "steps": o["steps"], "dtype": dtype,
                            "threads": o["threads"], "seed": 0})
    if "skip" in built:
        pytest.skip(built["skip"])
    if "error" in built:
        pytest.fail(f"{backend} could not build {model}:\n{built['error']}", pytrace=False)

    target = RoundInWorker(worker, o["steps"], o["warmup"] + o["rounds"])
    benchmark.group = f"{model} batch {batch} ({dtype})"
    benchmark.extra_info.update(backend=backend, version=built["version"], model=model, batch_size=batch, dtype=dtype,
                                threads=o["threads"] or "framework default", steps_per_round=o["steps"],
                                build_s=round(built["build_s"], 4),
                                timed="model.train_steps on in-memory batches staged on the device, device sync per round; "
                                      "statistics per train step")
    benchmark.pedantic(target, rounds=o["rounds"], warmup_rounds=o["warmup"], iterations=o["steps"])

    assert target.finite, f"{backend} {model} batch {batch}: non-finite weights during the benchmark"
    w = o["warmup"] if len(target.worker_s) > o["warmup"] else 0
    benchmark.extra_info["parent_wall_per_step_s"] = statistics.median(target.parent_s[w:]) / o["steps"]
    if w:
        benchmark.extra_info["warmup_round_per_step_s"] = target.worker_s[0] / o["steps"]
