"""The parent side: prepare one job (weights, data, batch order), run each backend in its own subprocess, collect rows.

Data flows one way: spec + seed -> canonical float64 initial weights and a batch order -> one subprocess per backend
(``harness.worker``) -> plain NumPy arrays -> compared with the NumPy float64 oracle -> raw JSON + NPZ.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

import backends
from models import get_model, init_weights
from models.data import DATASETS, load_dataset
from models.spec import DTYPES, INIT_PRESETS, Adam, ModelSpec, spec_to_dict

from . import agreement
from .rows import Row
from .status import Status

PROJECT_ROOT = Path(__file__).resolve().parent.parent
ORACLE = "numpy"
DEFAULT_STEPS = 20


class UserError(ValueError):
    """Bad input from the user: the CLI prints it and exits with code 2."""


@dataclass
class CompareConfig:
    model: str
    backends: list[str] = field(default_factory=lambda: list(backends.REGISTRY))
    batch_sizes: list[int] | None = None  # default: the spec's (1, N)
    steps: int = DEFAULT_STEPS
    dtype: str | None = None  # default: the spec's
    devices: list[str] = field(default_factory=lambda: ["cpu"])
    mode: str = "aligned"
    seed: int = 0
    init: str | None = None  # glorot | normal | uniform; default: the spec's
    dataset: str | None = None
    data_dir: str | None = None
    check_every: int = 10
    timing: bool = True
    timing_rounds: int = 5
    timing_steps: int = 20
    timeout: float = 900.0  # seconds per backend subprocess
    repeat: bool = True  # replay each trajectory in a fresh model: bit-identical?
    threads: int | None = None
    fast: bool = False


def check_names(model: str, backend_names: list[str], dtype: str | None) -> ModelSpec:
    """The model's spec, once the model, every backend and the dtype are known names (else a UserError naming the
    valid ones); shared by ``compare`` and ``sweep``."""
    try:
        spec = get_model(model)
    except ValueError as e:
        raise UserError(str(e)) from None
    for b in backend_names:
        try:
            backends.get_info(b)
        except ValueError as e:
            raise UserError(str(e)) from None
    if dtype is not None and dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; valid dtypes: {', '.join(DTYPES)}")
    return spec


def validate(cfg: CompareConfig) -> ModelSpec:
    """Check every user-facing option before any work starts; returns the spec with overrides applied."""
    spec = check_names(cfg.model, cfg.backends, cfg.dtype)
    for d in cfg.devices:
        if d not in ("cpu", "cuda"):
            raise UserError(f"unknown device {d!r}; valid devices: cpu, cuda, all")
    if cfg.mode not in ("aligned", "native"):
        raise UserError(f"unknown mode {cfg.mode!r}; valid modes: aligned, native")
    if cfg.steps < 1:
        raise UserError(f"--steps must be at least 1, got {cfg.steps}")
    if cfg.check_every < 1:
        raise UserError(f"--check-every must be at least 1, got {cfg.check_every}")
    if cfg.init is not None:
        if cfg.init not in INIT_PRESETS:
            raise UserError(f"unknown init {cfg.init!r}; valid: {', '.join(INIT_PRESETS)}")
        spec = spec.with_overrides(init=INIT_PRESETS[cfg.init])
    if cfg.dataset is not None:
        if cfg.dataset not in DATASETS:
            raise UserError(f"unknown dataset {cfg.dataset!r}; valid datasets: {', '.join(DATASETS)}")
        spec = spec.with_overrides(dataset=cfg.dataset)
    if cfg.dtype is not None:
        spec = spec.with_overrides(dtype=cfg.dtype)
    for b in cfg.batch_sizes or ():
        if b < 1:
            raise UserError(f"batch sizes must be positive integers, got {b}")
        try:
            spec.check_batch_size(b, "--batch-sizes")
        except ValueError as e:
            raise UserError(str(e)) from None
    check_seed(cfg.seed)
    check_threads(cfg.threads)
    if not 0 < cfg.timeout < math.inf:  # also refuses NaN
        raise UserError(f"--timeout must be a positive, finite number of seconds per backend subprocess, got "
                        f"{cfg.timeout:g}; leave it out for the default {CompareConfig.timeout:g}")
    return spec


SEED_LIMIT = 2 ** 32  # numpy's default_rng takes any non-negative int; below 2**32 it is a uint32 every tool takes


def check_seed(seed: int, what: str = "--seed") -> None:
    if not 0 <= seed < SEED_LIMIT:
        raise UserError(f"{what} must be an integer with 0 <= seed < 2**32 (numpy seeds are non-negative), "
                        f"got {seed}; for example {what} 0")


def check_threads(threads: int | None) -> None:
    if threads is not None and threads < 1:
        raise UserError(f"--threads must be at least 1, got {threads}; leave it out for each framework's default")


def check_positive(value: int, what: str, hint: str) -> None:
    if value < 1:
        raise UserError(f"{what} must be at least 1, got {value}; {hint}")


def parse_int_list(text: str, what: str) -> list[int]:
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise UserError(f"{what} must be comma-separated positive integers like '1,100', got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise UserError(f"{what} must be comma-separated positive integers like '1,100', got {text!r}")
    return values


# --------------------------------------------------------------------------------------------------- job preparation
def load_data(spec: ModelSpec, data_dir: str | None):
    ds = load_dataset(spec.dataset, data_dir)
    x = ds.x_train
    n_in = math.prod(spec.input_shape)
    if math.prod(x.shape[1:]) != n_in:
        raise UserError(f"dataset {spec.dataset!r} has samples of shape {x.shape[1:]}, model {spec.name!r} expects "
                        f"{spec.input_shape}; pick a dataset with {n_in} features per sample")
    reshape = lambda a: None if a is None else a.reshape((len(a),) + tuple(spec.input_shape))
    return ds, reshape(ds.x_train), ds.y_train, reshape(ds.x_test), ds.y_test


def epoch_permutation(n: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """The sample order of one epoch; the same for every batch size, so batch 1 and batch N see the same sequence."""
    if not shuffle:
        return np.arange(n)
    return np.random.default_rng([seed, epoch]).permutation(n)


def batch_order(n: int, batch_size: int, steps: int, seed: int, shuffle: bool) -> np.ndarray:
    """(steps, batch_size) sample indices: consecutive epochs, each cut into floor(n / batch_size) full batches (the
    last partial batch of an epoch is dropped in every backend alike)."""
    if batch_size > n:
        raise UserError(f"batch size {batch_size} is larger than the data set ({n} samples); use at most {n}")
    per_epoch = n // batch_size
    epochs = math.ceil(steps / per_epoch)
    rows = [epoch_permutation(n, seed, e, shuffle)[: per_epoch * batch_size].reshape(per_epoch, batch_size)
            for e in range(epochs)]
    return np.concatenate(rows)[:steps]


@dataclass
class Job:
    spec: ModelSpec
    dataset_source: str
    weights: list[np.ndarray]  # the first seed's canonical initial weights
    data: dict[str, np.ndarray]  # x, y, probe_x, and per seed S: seed<S>/order_<B>, seed<S>/w/<j>
    batch_sizes: list[int]
    seeds: list[int]

    def order(self, batch_size: int, seed: int | None = None) -> np.ndarray:
        return self.data[f"seed{self.seeds[0] if seed is None else seed}/order_{batch_size}"]


def prepare(cfg: CompareConfig, spec: ModelSpec, seeds: list[int] | None = None) -> Job:
    """Data, and for each seed (default: ``cfg.seed``) the initial weights and the batch order of every batch size."""
    ds, x, y, x_test, _ = load_data(spec, cfg.data_dir)
    batch_sizes = cfg.batch_sizes or list(spec.batch_sizes)
    seeds = [cfg.seed] if seeds is None else list(seeds)
    probe_src = x_test if x_test is not None else x
    data = {"x": x, "y": y, "probe_x": probe_src[: min(100, len(probe_src))]}
    first = None
    for seed in seeds:
        weights = init_weights(spec, seed)
        first = first or weights
        for b in batch_sizes:
            data[f"seed{seed}/order_{b}"] = batch_order(len(x), b, cfg.steps, seed, spec.shuffle)
        for j, w in enumerate(weights):
            data[f"seed{seed}/w/{j}"] = w
    return Job(spec, ds.source, first, data, batch_sizes, seeds)


# ------------------------------------------------------------------------------------------------------ subprocesses
def subprocess_env(backend: str, dtype: str, threads: int | None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(backends.get_info(backend).env)
    env["PYTHONPATH"] = os.pathsep.join([str(PROJECT_ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if dtype == "float64":
        env["JAX_ENABLE_X64"] = "1"  # must be set before jax (or keras on jax) is imported
    if threads:
        for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            env[k] = str(threads)
        if threads == 1:  # XLA (JAX) reads its thread settings only from flags at start-up
            # (intra_op_parallelism_threads is not an XLA_FLAGS flag, only a field of XLA's ExecutionOptions: written
            # as --intra_op_parallelism_threads=1 it makes XLA abort with "Unknown flag in XLA_FLAGS")
            env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false").strip()
    return env


def write_job(job_dir: Path, job: dict) -> None:
    """The job a worker reads: plain JSON, the spec in its dict form (``models.spec.spec_to_dict``), no pickle."""
    (job_dir / "job.json").write_text(json.dumps({**job, "spec": spec_to_dict(job["spec"])}))


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def run_backend(backend: str, job: Job, runs: list[dict], options: dict, timeout: float, work_dir: Path,
                on_row: Callable[[Row], Row] | None = None) -> list[Row]:
    """Run ``backend`` on ``runs`` in one subprocess; one row per run (status ok/skipped/error/diverged/...).

    Rows are read as the worker finishes them; ``on_row(row)`` sees each one as soon as it is written (a long sweep
    judges it and drops its arrays there) and returns the row to keep."""
    on_row = on_row or (lambda r: r)
    base = {"backend": backend, "dtype": options["dtype"], "mode": options["mode"], "fast": bool(options.get("fast"))}
    missing = backends.missing_requirements(backend)
    if missing:
        reason = f"not installed ({', '.join(missing)}): {backends.install_hint(backend)}"
        return [on_row(Row(**base, **_run_fields(r), status=Status.SKIPPED, reason=reason)) for r in runs]
    job_dir = Path(tempfile.mkdtemp(prefix=f"{backend}-", dir=work_dir))
    write_job(job_dir, {"backend": backend, "spec": job.spec, "runs": runs, "options": options})
    np.savez(job_dir / "data.npz", **job.data)
    cmd = [sys.executable, "-m", "harness.worker", str(job_dir)]
    env = subprocess_env(backend, options["dtype"], options.get("threads"))
    rows: dict[int, Row] = {}

    def take_ready() -> None:  # the worker finishes runs in order
        skipped = _head(job_dir).get("status") == Status.SKIPPED
        for i in range(len(rows), len(runs)):
            if not (skipped or (job_dir / f"run-{i}.json").exists()):
                break
            rows[i] = on_row(_collect_one(job_dir, base, i, runs[i]))

    def rest(status: Status, reason: str) -> list[Row]:
        for i, run in enumerate(runs):
            if i not in rows:
                rows[i] = on_row(Row(**base, **_run_fields(run), status=status, reason=reason))
        shutil.rmtree(job_dir, ignore_errors=True)
        return [rows[i] for i in range(len(runs))]

    with open(job_dir / "stdout.txt", "w") as out, open(job_dir / "stderr.txt", "w") as err:
        proc = subprocess.Popen(cmd, env=env, cwd=str(PROJECT_ROOT), stdout=out, stderr=err, text=True,
                                start_new_session=True)
    crash = None
    deadline = time.monotonic() + timeout
    try:
        while True:
            finished = proc.poll() is not None
            take_ready()
            if finished:
                break
            if time.monotonic() > deadline:
                _kill(proc)
                take_ready()
                crash = f"timeout: no result after {timeout:g} s (raise it with --timeout)"
                break
            time.sleep(0.05)
        if crash is None and proc.returncode != 0:
            sig = -proc.returncode if proc.returncode < 0 else None
            what = f"killed by signal {signal.Signals(sig).name}" if sig else f"exit code {proc.returncode}"
            crash = f"subprocess {what}; stderr tail:\n{_tail((job_dir / 'stderr.txt').read_text(errors='replace'))}"
    except KeyboardInterrupt:
        _kill(proc)
        take_ready()
        raise Interrupted(rest(Status.INTERRUPTED, "interrupted by the user (Ctrl-C)")) from None
    return rest(Status.ERROR, crash or "the subprocess exited normally but wrote no result for this run")


class Interrupted(Exception):
    def __init__(self, rows):
        super().__init__("interrupted")
        self.rows = rows


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()
    proc.wait()


def _run_fields(run: dict) -> dict:
    """What a row says about its run: batch size, device, seed, and for the oracle's variants their dtype/rounding."""
    out = {"batch_size": run["batch_size"], "device": run["device"], "seed": run.get("seed")}
    if "dtype" in run:
        out["dtype"] = run["dtype"]
    if "variant" in run:
        out["variant"] = run["variant"]
    return out


def _head(job_dir: Path) -> dict:
    import json

    path = job_dir / "worker.json"
    try:
        return json.loads(path.read_text()) if path.exists() else {}
    except json.JSONDecodeError:  # written atomically; only a foreign file could be half-written
        return {}


# CPython 3.11 before 3.11.8 can raise "SystemError: AST constructor recursion depth mismatch" when two threads parse
# at once (python/cpython#106905, fixed by #113035); np.load parses every array header with ast.literal_eval, and
# `harness selftest` collects rows in threads (it failed that way once in the test suite): one header parse at a time.
_NPZ_LOCK = threading.Lock()


def _collect_one(job_dir: Path, base: dict, i: int, run: dict) -> Row:
    """The row of run ``i`` from what the worker wrote (its JSON and NPZ are removed once read)."""
    head = _head(job_dir)
    fields = {**base, **_run_fields(run), "version": head.get("version"), "env": head.get("env")}
    if head.get("status") == Status.SKIPPED:
        return Row(**fields, status=Status.SKIPPED, reason=head["reason"])
    meta = json.loads((job_dir / f"run-{i}.json").read_text())
    status, reason = meta.pop("status"), meta.pop("reason", None)
    arrays = None
    npz = job_dir / f"run-{i}.npz"
    if npz.exists():
        with _NPZ_LOCK, np.load(npz) as f:
            arrays = {k: f[k] for k in f.files}
        npz.unlink()
    return Row(**fields, status=status, reason=reason, meta=meta, arrays=arrays)


# ------------------------------------------------------------------------------------------------------- comparison
def variants_for(spec: ModelSpec, dtype: str, batch_size: int) -> list[str]:
    """The oracle's rounding variants whose spread is the envelope (``backends.numpy_scratch.ROUNDING_VARIANTS``).

    "plain" is the oracle's own code in ``dtype`` (in float64 that is the oracle itself: left out).  The others change
    orders of operations (blocked matmuls and Adam in torch's order; the batch reversed and the other softmax/sigmoid
    formula; each part left out where it would compute the very same bits: batch order at batch 1, Adam's order for
    SGD, the formula where the loss has none) and all add Monte Carlo arithmetic (every k-term matmul result moved by
    up to one ulp of the sum of its terms' magnitudes, every Adam moment by one ulp, seeded by the variant's name), so
    that the envelope also samples roundings that no reordering of NumPy's own code reaches.  In float32 a "switch"
    probe (the same at 64 ulps) takes the ReLU / max-pool switches that the one-ulp variants may all miss; it bounds
    only late gradients, weights and final predictions."""
    first, second = ["blocked"], ["reversed"] if batch_size > 1 else []
    if isinstance(spec.optimizer, Adam):
        first.append("adam_order")
    if spec.loss.prediction in ("sigmoid", "softmax"):
        second.append("formula")
    names = ["+".join(v + ["mca"]) for v in (first, second) if v] + ["mca"]
    # float32 only: the switch probe, counted in the late envelope of gradients, weights and final predictions alone
    # (agreement.is_switch_probe); float64 trajectories show no switch within the compared steps (results/calibration.md)
    return (["plain"] if dtype != "float64" else []) + names + (["switch"] if dtype == "float32" else [])


@dataclass
class Oracle:
    """The float64 oracle of every (seed, batch size) and the rounding envelope around it in the compared dtype."""

    rows: dict[tuple[int, int], Row]  # (seed, batch size) -> the float64 oracle's row (with its arrays)
    references: dict[tuple[int, int], agreement.Reference]
    problems: list[str]  # oracle or variant runs that did not finish (their checks are then missing or unbounded)

    def reference(self, row: Row) -> agreement.Reference | None:
        return self.references.get((row.get("seed"), row["batch_size"]))


def run_oracle(job: Job, dtype: str, steps: int, check_every: int, options: dict, timeout: float, work: Path,
               progress: Callable[[str], None] = lambda s: None) -> Oracle:
    """One subprocess: the float64 oracle and its rounding variants in ``dtype``, for every seed and batch size of
    ``job``; the variants' arrays are reduced to the envelope as soon as they arrive."""
    spec = job.spec
    runs = []
    for seed in job.seeds:
        for b in job.batch_sizes:
            common = {"seed": seed, "batch_size": b, "device": "cpu", "steps": steps, "check_every": check_every}
            runs.append({**common, "dtype": "float64"})
            runs += [{**common, "dtype": dtype, "variant": v, "extra": {"rounding": "" if v == "plain" else v}}
                     for v in variants_for(spec, dtype, b)]
    oracle = Oracle({}, {}, [])
    pending: dict[tuple[int, int], dict] = {}

    def on_row(row: Row) -> Row:
        key = (row["seed"], row["batch_size"])
        if row.get("variant") is None:
            pending[key] = {"oracle": row, "variants": {}}
            if row["status"] != Status.OK:
                oracle.problems.append(f"oracle seed {key[0]} batch {key[1]}: {row['status']}: {row.get('reason')}")
            return row
        pending[key]["variants"][row["variant"]] = row
        if row["status"] != Status.OK:
            oracle.problems.append(f"oracle variant {row['variant']} ({dtype}) seed {key[0]} batch {key[1]}: "
                                   f"{row['status']}: {row.get('reason')}")
        if len(pending[key]["variants"]) == len(variants_for(spec, dtype, key[1])):
            done = pending.pop(key)
            o = done["oracle"]
            oracle.rows[key] = o
            if o["status"] == Status.OK:
                good = {v: r["arrays"] for v, r in done["variants"].items() if r["status"] == Status.OK}
                oracle.references[key] = agreement.build_reference(spec, dtype, o["arrays"], good)
        return row.but(arrays=None)

    progress(f"oracle: numpy float64 and its rounding variants in {dtype} ({len(runs)} runs: seeds {span(job.seeds)}, "
             f"batch sizes {job.batch_sizes})")
    try:
        run_backend(ORACLE, job, runs, {**options, "dtype": "float64", "mode": "aligned", "fast": False, "extra": {}},
                    timeout, work, on_row)
    except Interrupted:  # Ctrl-C during the oracle: no backend row has run yet (the oracle's rows are not results)
        raise Interrupted([]) from None
    for p in oracle.problems:
        progress(f"  {p}")
    return oracle


def span(seeds: list[int]) -> str:
    return f"{seeds[0]}..{seeds[-1]}" if len(seeds) > 2 else ", ".join(map(str, seeds))


def _batches(job: Job, row: Row, spec: ModelSpec, steps: set[int]) -> dict[int, tuple]:
    """step -> (x, y) of the run's batch at each of ``steps`` (float64 x; integer or float64 y)."""
    order = job.order(row["batch_size"], row.get("seed"))
    x, y = job.data["x"], job.data["y"]
    return {s: (x[order[s]].astype(np.float64), y[order[s]].astype(np.int64) if spec.loss.integer_labels
                else y[order[s]].astype(np.float64)) for s in steps if s < len(order)}


def _first_update_rejudged(spec: ModelSpec, ref: agreement.Reference, job: Job, row: Row, checks: list,
                           runs: list[dict]) -> list:
    """``checks`` with each failing step-1 weight check judged again as the first update of a gradient inside the
    step-0 gradient's bound (``agreement.first_update_checks``), for every run of ``runs`` (one row, or the two rows of
    a pair: the worse of the two then stands for the pair, each being allowed its own first update)."""
    moved = {c.tensor for c in checks if c.quantity == "weights" and c.step == 1 and c.ok is False}
    if not moved:
        return checks
    init = [job.data[f"seed{row.get('seed')}/w/{j}"] for j in range(len(spec.param_names()))]
    redo: dict[str, agreement.Check] = {}
    for arrays in runs:
        for c in agreement.first_update_checks(spec, ref, arrays, init):
            if c.tensor in moved and (c.tensor not in redo or c.ratio > redo[c.tensor].ratio):
                redo[c.tensor] = c
    kept = [c for c in checks if not (c.quantity == "weights" and c.step == 1 and c.tensor in redo)]
    return sorted(kept + list(redo.values()), key=lambda c: c.step)


def own_dropout_rng(spec: ModelSpec, row: Row) -> bool:
    """A native row of a model with dropout whose backend drew the masks with its framework's RNG (the NumPy backend
    has none: it applies the harness's masks in both modes and says so with ``info["dropout_masks"] == "harness"``)."""
    info = (row.get("meta") or {}).get("info") or {}
    return row["mode"] == "native" and bool(spec.random_layers) and info.get("dropout_masks") != "harness"


def without_masks(checks: list) -> list:
    """What a run with other dropout masks can still be compared on: inference at the initial weights."""
    return [c for c in checks if c.quantity == "invariance/pred" or (c.quantity == "pred" and c.step == 0)]


def judge(spec: ModelSpec, row: Row, oracle: Oracle, job: Job | None = None) -> Row:
    """The judged row of a finished run: pass / fail / diverged with its checks (native: matches spec / differs); with
    ``job`` (its data and batch orders) a gradient after step 0 that leaves the trajectory's envelope is judged again
    at the run's own weights, and a timed row gets its time per epoch.  Rows that did not finish come back as they are."""
    arrays = row.get("arrays", {})
    nonfinite = agreement.first_nonfinite(spec, arrays) if row["status"] in (Status.OK, Status.DIVERGED) else None
    if row["status"] == Status.DIVERGED or nonfinite:
        ref = oracle.reference(row)
        diagnosis = (diagnose_row(spec, row, ref, job, []) if job is not None and ref is not None and arrays
                     and row["mode"] == "aligned" else None)
        return row.but(status=Status.DIVERGED, reason=nonfinite or row.get("reason"),
                       **({"diagnosis": diagnosis} if diagnosis else {}))
    if row["status"] != Status.OK:
        return row
    ref = oracle.reference(row)
    if ref is None:
        o = oracle.rows.get((row.get("seed"), row["batch_size"]))
        return row.but(status=Status.ERROR, reason="no oracle run to compare with"
                       + (f" ({o['status']}: {o.get('reason')})" if o else ""))
    checks = agreement.invariance_checks(spec, ref, arrays) + agreement.compare_runs(spec, ref, arrays)
    # a gradient after step 0 outside the trajectory's envelope is judged again where it was computed, at the run's own
    # weights (agreement.local_gradient_checks): either is evidence of a correct implementation, and only the rare
    # failing step pays for the oracle's re-evaluation
    parted = {c.step for c in checks if c.quantity == "grads" and c.ok is False and c.step >= 1}
    if job is not None and parted:
        local = agreement.local_gradient_checks(spec, ref.dtype, arrays, _batches(job, row, spec, parted),
                                                [v for v in ref.variants if not agreement.is_switch_probe(v)],
                                                seed=row.get("seed", 0))
        steps = {c.step for c in local}
        checks = [c for c in checks if not (c.quantity == "grads" and c.step in steps)] + local
        checks.sort(key=lambda c: c.step)
    # a step-1 weight beyond its bound is judged again as the first update of a gradient inside the step-0 gradient's
    # bound (agreement.first_update_checks): Adam's first step turns the sign of a near-zero gradient into a whole lr
    if job is not None:
        checks = _first_update_rejudged(spec, ref, job, row, checks, [arrays])
    untracked = own_dropout_rng(spec, row)
    if untracked:
        checks = without_masks(checks)
    summary = agreement.summarize(checks)
    summary["variants"] = ref.variants
    status = summary["status"]
    reason = agreement.describe_failure(summary["first_failure"]) if summary["first_failure"] else row.get("reason")
    native = {}
    if row["mode"] == "native":
        # the defaults audit: a native row is expected to part from the spec; say whether and how far
        status = Status.MATCHES if status == Status.PASS else Status.DIFFERS
        if untracked and not summary["first_failure"]:
            reason = "not comparable: framework RNG (Dropout masks) for trajectories; inference matches"
        diffs = ((row.get("meta") or {}).get("info") or {}).get("native_differences")
        native = {"native_differences": None if diffs is None else tuple(diffs),
                  "not_comparable": ("trajectories (loss, gradients, weights, state, final predictions): framework "
                                     "RNG draws the Dropout masks; compared: inference-mode predictions at the "
                                     "initial weights") if untracked else None}
    if status == Status.FAIL and job is not None and not untracked:  # why, not only where (harness/diagnose.py)
        native["diagnosis"] = diagnose_row(spec, row, ref, job, [c.as_dict() for c in checks if c.ok is False])
    meta = row.get("meta") or {}
    if job is not None and meta.get("timing"):  # an epoch = the full batches of the training set
        epoch_s = meta["timing"]["median_s"] * (len(job.data["x"]) // row["batch_size"])
        meta = {**meta, "timing": {**meta["timing"], "epoch_s": epoch_s}}
    return row.but(status=status, reason=reason, agreement=summary, meta=meta or row.meta,
                   checks=tuple(c.as_dict() for c in checks if c.ok is False)[:50],  # the failing ones
                   **native)


def diagnose_row(spec: ModelSpec, row: Row, ref: agreement.Reference, job: Job, failing: list[dict]) -> dict:
    """The diagnosis of a failing or diverged row (``harness.diagnose``): the named hypotheses that explain it, tested
    against the oracle rerun in this process; a diagnosis that cannot be made says why, never fails the run."""
    from . import diagnose

    try:
        init = [job.data[f"seed{row.get('seed')}/w/{j}"] for j in range(len(spec.param_names()))]
        return diagnose.diagnose(spec, row, ref, job.data, init, failing)
    except Exception as e:  # noqa: BLE001 - the verdict stands; the diagnosis says what went wrong
        return {"error": f"{type(e).__name__}: {e}", "probable": []}


def compare(cfg: CompareConfig, progress: Callable[[str], None] = lambda s: None, executor=None) -> dict:
    """Run every requested backend against the oracle on ``executor`` (default: this machine, one subprocess after
    another; ``harness.executors``); returns the result (rows with arrays, metadata)."""
    from .executors import run_groups

    (result,) = run_groups([cfg], executor, progress)
    return result


def pairwise(spec: ModelSpec, rows: list[Row], oracle: Oracle, job: Job | None = None) -> list[dict]:
    """Every pair of finished rows at the same batch size and device: worst scaled error over everything compared,
    and whether the two agree within twice the rounding bound (each may sit anywhere in its own)."""
    done = [r for r in rows if "arrays" in r and r["status"] in (Status.PASS, Status.FAIL, Status.MATCHES,
                                                                   Status.DIFFERS)]
    out = []
    for i, a in enumerate(done):
        for b in done[i + 1:]:
            ref = oracle.reference(a)
            if (a["batch_size"], a["device"]) != (b["batch_size"], b["device"]) or ref is None:
                continue
            checks = agreement.compare_runs(spec, ref, a["arrays"], b["arrays"])
            if own_dropout_rng(spec, a) or own_dropout_rng(spec, b):  # other masks: inference at the start only
                checks = without_masks(checks)
            elif job is not None:
                checks = _first_update_rejudged(spec, ref, job, a, checks, [a["arrays"], b["arrays"]])
            s = agreement.summarize(checks)
            out.append({"a": a["backend"], "b": b["backend"], "batch_size": a["batch_size"], "device": a["device"],
                        "status": s["status"], "worst": max(s["worst"].values(), default=0.0),
                        "first_failure": s["first_failure"]})
    return out


# --------------------------------------------------------------------------------------------------------- training
@dataclass
class TrainConfig:
    model: str
    backend: str = "numpy"
    epochs: int | None = None  # default: the spec's
    batch_size: int | None = None  # default: the spec's N
    dtype: str | None = None
    mode: str = "aligned"
    seed: int = 0
    init: str | None = None
    dataset: str | None = None
    data_dir: str | None = None
    device: str = "cpu"
    threads: int | None = None
    fast: bool = False


def train(cfg: TrainConfig, on_event: Callable[[dict], None] = lambda e: None) -> dict:
    """Full training of one backend in its subprocess; ``on_event`` gets each progress / epoch line as it comes."""
    import json

    spec = validate(CompareConfig(model=cfg.model, backends=[cfg.backend], dtype=cfg.dtype, init=cfg.init,
                                  dataset=cfg.dataset, devices=[cfg.device], mode=cfg.mode, seed=cfg.seed,
                                  threads=cfg.threads))
    epochs = spec.epochs if cfg.epochs is None else cfg.epochs
    check_positive(epochs, "--epochs", f"leave it out for the model's {spec.epochs}")
    b = max(spec.batch_sizes) if cfg.batch_size is None else cfg.batch_size
    check_positive(b, "--batch-size", f"leave it out for the model's {max(spec.batch_sizes)}")
    missing = backends.missing_requirements(cfg.backend)
    if missing:
        return {"status": Status.SKIPPED, "reason": f"not installed ({', '.join(missing)}): "
                                                    f"{backends.install_hint(cfg.backend)}", "epochs": []}
    ds, x, y, x_test, y_test = load_data(spec, cfg.data_dir)
    if b > len(x):
        raise UserError(f"batch size {b} is larger than the data set ({len(x)} samples); use at most {len(x)}")
    data = {"x": x, "y": y}
    if x_test is not None:
        data.update(x_test=x_test, y_test=y_test)
    weights = init_weights(spec, cfg.seed)
    for j, w in enumerate(weights):
        data[f"w/{j}"] = w
    for e in range(epochs):
        data[f"epoch_{e}"] = epoch_permutation(len(x), cfg.seed, e, spec.shuffle)
    result = {"status": Status.OK, "epochs": [], "data_source": ds.source, "batch_size": b, "spec": spec}
    with tempfile.TemporaryDirectory(prefix="dlcompare-train-") as tmp:
        job_dir = Path(tmp)
        options = {"dtype": spec.dtype, "mode": cfg.mode, "threads": cfg.threads, "fast": cfg.fast,
                   "device": cfg.device}
        write_job(job_dir, {"backend": cfg.backend, "spec": spec, "kind": "train", "options": options,
                            "epochs": epochs, "batch_size": b, "out": str(job_dir / "final.npz"), "runs": []})
        np.savez(job_dir / "data.npz", **data)
        env = subprocess_env(cfg.backend, spec.dtype, cfg.threads)
        proc = subprocess.Popen([sys.executable, "-m", "harness.worker", str(job_dir)], env=env, cwd=str(PROJECT_ROOT),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            for line in proc.stdout:
                try:
                    event = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a framework's own chatter on stdout
                if event.get("event") == "epoch":
                    result["epochs"].append(event)
                    if "diverged_at" in event:
                        result.update(status=Status.DIVERGED,
                                      reason=f"diverged at step {event['diverged_at']} (loss)")
                on_event(event)
            err = proc.stderr.read()
            proc.wait()
        except KeyboardInterrupt:
            _kill(proc)
            result.update(status=Status.INTERRUPTED, reason="interrupted by the user (Ctrl-C)")
            return result
        head_path = job_dir / "worker.json"
        head = json.loads(head_path.read_text()) if head_path.exists() else {}
        if head.get("status") == Status.SKIPPED:
            result.update(status=Status.SKIPPED, reason=head["reason"])
        elif proc.returncode != 0:
            result.update(status=Status.ERROR,
                          reason=f"subprocess exit code {proc.returncode}; stderr tail:\n{_tail(err)}")
        result["version"] = head.get("version")
    return result
