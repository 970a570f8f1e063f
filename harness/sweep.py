"""``harness sweep``: cost versus work.  Every backend timed over a range of batch sizes (and of hidden widths of an
MLP), beside the machine's own measured matrix-multiply rate, so that each point reads as a fraction of what the
hardware can do.

* **What is timed** is what ``harness compare`` times (``harness/timing.py``: batches staged on the device, untimed;
  median and IQR of the per-step time over timed rounds after a warm-up, the device synchronised before every clock
  read), plus, per point, the model's construction and its first training step (tracing and compilation included
  wherever the framework does them).  Every point builds a fresh model from the spec's canonical initial weights and
  trains on the harness's own data (real MNIST digits for the MNIST models: on the MNIST MLP's normal(0, 1) init the
  float32 gradients become subnormal, which slows some matmuls, see ``benchmarks/README.md``).
* **Work** is the matmul / convolution FLOPs of one training step, counted from the spec (:func:`train_flops`):
  ``2 * batch * in * out`` per Dense layer for the forward pass, as much again for the kernel's gradient and again for
  the input's gradient (not for the first layer, whose input needs none); convolutions alike per output pixel.
  Activations, the loss, pooling and the optimizer update are not counted (at batch 1 they are a large part of the
  real cost: that is what the curves show).
* **The hardware limit** is measured by the sweep on the same machine, in the same process set-up and thread count as
  the backends: the best rate of a square matrix multiply in the sweep's dtype over a few sizes (NumPy's BLAS on the
  CPU; torch or CuPy on CUDA).  A framework with another BLAS (oneDNN, Eigen, XLA) can beat it: a fraction above 1
  says so, it is not an error.
* **Isolation**: each backend runs in its own subprocess (``python -m harness.sweep JOB``), one after another, so
  that no two frameworks share the cores; each point's result is streamed back as one JSON line, so a crash or a
  timeout loses only the points not yet done, and Ctrl-C keeps every finished point.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import backends
from models.spec import Conv2D, Dense, ModelSpec, spec_from_dict, spec_to_dict

from .runner import PROJECT_ROOT, UserError, check_names, subprocess_env

DEFAULT_BATCH_SIZES = [2**k for k in range(11)]  # 1 .. 1024


@dataclass
class SweepConfig:
    model: str = "mnist_mlp"
    backends: list[str] = field(default_factory=lambda: list(backends.REGISTRY))
    batch_sizes: list[int] = field(default_factory=lambda: list(DEFAULT_BATCH_SIZES))
    widths: list[int] = field(default_factory=list)  # hidden widths of an MLP, timed at width_batch
    width_batch: int = 100
    dtype: str | None = None  # default: the model's
    device: str = "cpu"
    threads: int | None = 1  # 1: reproducible on a shared machine; None: each framework's default pools
    rounds: int = 5
    steps: int = 10  # distinct batches per timed round (a round repeats them until it lasts min_round_s)
    min_round_s: float = 0.05
    seed: int = 0
    fast: bool = False
    timeout: float = 1800.0  # seconds per backend subprocess
    data_dir: str | None = None


# --------------------------------------------------------------------------------------------------------- the work
def _dense_flops(layer: Dense, shape, batch: int, first: bool) -> int:
    f = 2 * batch * shape[0] * layer.units
    return f * (2 if first else 3)


def _conv_flops(layer: Conv2D, shape, batch: int, first: bool) -> int:
    out = layer.output_shape(shape)
    f = 2 * batch * out[0] * out[1] * layer.filters * layer.kernel_size[0] * layer.kernel_size[1] * shape[2]
    return f * (2 if first else 3)


FLOP_COUNTERS = {Dense: _dense_flops, Conv2D: _conv_flops}  # other layers: no matmul work counted


def train_flops(spec: ModelSpec, batch: int) -> int:
    """Matmul / convolution FLOPs of one training step (forward, kernel gradients, input gradients but the first
    layer's); layers without a matrix product count 0."""
    total, first = 0, True
    for layer, shape in zip(spec.layers, spec.input_shapes()):
        count = FLOP_COUNTERS.get(type(layer))
        if count is not None:
            total += count(layer, shape, batch, first)
            first = False
    return total


def width_variant(spec: ModelSpec, width: int) -> ModelSpec:
    """The MLP ``spec`` with every hidden Dense layer ``width`` wide (the output layer keeps its size)."""
    dense = [i for i, layer in enumerate(spec.layers) if isinstance(layer, Dense)]
    if len(dense) < 2 or any(type(layer) is not Dense for layer in spec.layers):
        raise UserError(f"--widths needs an MLP (Dense layers only, at least one hidden); {spec.name!r} has "
                        f"{', '.join(type(layer).__name__ for layer in spec.layers)}; leave --widths out")
    layers = tuple(dataclasses.replace(layer, units=width) if i in dense[:-1] else layer
                   for i, layer in enumerate(spec.layers))
    v = dataclasses.replace(spec, name=f"{spec.name}_w{width}", layers=layers, expected_params=0)
    return dataclasses.replace(v, expected_params=v.param_count())


def hidden_width(spec: ModelSpec) -> int | None:
    dense = [layer for layer in spec.layers if isinstance(layer, Dense)]
    return dense[0].units if len(dense) > 1 else None


def points(cfg: SweepConfig, spec: ModelSpec) -> list[dict]:
    """The sweep's points: the batch sweep of ``spec``, then the width sweep at ``width_batch``."""
    out = [{"sweep": "batch", "batch": b, "width": hidden_width(spec), "spec": spec} for b in cfg.batch_sizes]
    out += [{"sweep": "width", "batch": cfg.width_batch, "width": w, "spec": width_variant(spec, w)} for w in cfg.widths]
    for p in out:
        p["flops"] = train_flops(p["spec"], p["batch"])
        p["params"] = p["spec"].param_count()
    return out


def validate(cfg: SweepConfig) -> ModelSpec:
    """Every option checked before any work starts (UserError: exit 2); returns the spec in the sweep's dtype."""
    spec = check_names(cfg.model, cfg.backends, cfg.dtype)
    if cfg.dtype:
        spec = dataclasses.replace(spec, dtype=cfg.dtype)
    if cfg.device not in ("cpu", "cuda"):
        raise UserError(f"unknown device {cfg.device!r}; valid devices: cpu, cuda")
    for what, values in (("--batch-sizes", cfg.batch_sizes), ("--widths", cfg.widths)):
        if any(v < 1 for v in values):
            raise UserError(f"{what} must be positive integers, got {values}")
    if not cfg.batch_sizes and not cfg.widths:
        raise UserError("nothing to sweep: give --batch-sizes and/or --widths")
    if cfg.width_batch < 1 or cfg.rounds < 1 or cfg.steps < 1:
        raise UserError(f"--width-batch, --rounds and --steps must be at least 1 (got {cfg.width_batch}, "
                        f"{cfg.rounds}, {cfg.steps})")
    if cfg.threads is not None and cfg.threads < 1:
        raise UserError(f"--threads must be at least 1 (got {cfg.threads}); use 0 on the command line for each "
                        f"framework's default")
    for b in cfg.batch_sizes + ([cfg.width_batch] if cfg.widths else []):
        spec.check_batch_size(b)
    if cfg.widths:
        width_variant(spec, cfg.widths[0])
    return spec


# ----------------------------------------------------------------------------------------------- the driver side
def _run_job(job: dict, env: dict, timeout: float, on_line) -> str | None:
    """Run ``python -m harness.sweep JOB`` on ``job`` (written to a temporary file), handing each JSON line of its
    stdout to ``on_line``; returns why it ended badly, or None.  Ctrl-C kills the worker and propagates."""
    with tempfile.TemporaryDirectory(prefix="dlcompare-sweep-") as d:
        path = Path(d) / "job.json"
        path.write_text(json.dumps(job))
        return _worker([sys.executable, "-m", "harness.sweep", str(path)], env, timeout, on_line)


def _worker(cmd: list[str], env: dict, timeout: float, on_line) -> str | None:
    """Run one worker, handing each JSON line of its stdout to ``on_line``; returns why it ended badly, or None."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=PROJECT_ROOT,
                            start_new_session=True)
    err: list[str] = []
    drain = threading.Thread(target=lambda: err.extend(proc.stderr), daemon=True)
    drain.start()
    timer = threading.Timer(timeout, lambda: os.killpg(proc.pid, signal.SIGKILL))
    timer.start()
    try:
        for line in proc.stdout:
            if line.startswith("{"):
                on_line(json.loads(line))
        proc.wait()
    except KeyboardInterrupt:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    finally:
        timer.cancel()
    drain.join(timeout=5)
    if proc.returncode == 0:
        return None
    if proc.returncode == -signal.SIGKILL and not timer.is_alive():
        return f"timed out after {timeout:.0f} s"
    tail = "".join(err[-15:]).strip()
    return f"worker exited with code {proc.returncode}" + (f": {tail.splitlines()[-1]}" if tail else "")


def measure_peak(cfg: SweepConfig, dtype: str) -> dict:
    """The machine's matrix-multiply rate, measured in a subprocess set up as the backends' are."""
    job = {"kind": "peak", "dtype": dtype, "device": cfg.device, "threads": cfg.threads}
    found: list[dict] = []
    why = _run_job(job, subprocess_env("numpy", dtype, cfg.threads), 300, found.append)
    if found and "gflops" in found[-1]:
        return found[-1]
    return {"gflops": None, "reason": why or (found[-1].get("reason") if found else "no result")}


def run(cfg: SweepConfig, progress=print) -> dict:
    """Time every backend over the sweep's points; returns the raw record (``write`` saves it).  Ctrl-C keeps the
    finished points and marks the record interrupted."""
    from .results import git_commit, machine

    spec = validate(cfg)
    pts = points(cfg, spec)
    dtype = spec.dtype
    started = time.time()
    record = {"schema": 1, "kind": "sweep", "model": spec.name, "device": cfg.device, "dtype": dtype,
              "created_utc": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(started)), "commit": git_commit(),
              "machine": machine(), "config": dataclasses.asdict(cfg),
              "flags": {k: os.environ.get(k) for k in ("TF_ENABLE_ONEDNN_OPTS", "OMP_NUM_THREADS")},
              "points": [{k: v for k, v in p.items() if k != "spec"} for p in pts],
              "versions": {}, "rows": [], "interrupted": False}
    try:
        record["load_before"] = os.getloadavg()
    except OSError:
        pass
    progress(f"sweep {spec.name} ({dtype}, {cfg.device}, threads {cfg.threads or 'framework default'}): "
             f"{len(pts)} points x {len(cfg.backends)} backends")
    record["peak"] = measure_peak(cfg, dtype)
    pk = record["peak"]
    progress(f"matrix-multiply rate: {pk['gflops']:.1f} GFLOP/s ({pk.get('library')}, n={pk.get('n')})"
             if pk.get("gflops") else f"matrix-multiply rate: not measured ({pk.get('reason')})")
    for b in cfg.backends:
        record["versions"][b] = backends.version(b)
        if record["interrupted"]:
            record["rows"] += [_row(b, p, i, "interrupted", reason="not started: Ctrl-C") for i, p in enumerate(pts)]
            continue
        rows, record["interrupted"] = _sweep_backend(cfg, b, dtype, pts, progress)
        record["rows"] += rows
        if record["interrupted"]:
            progress("interrupted: the finished points are kept")
    record["duration_s"] = time.time() - started
    try:
        record["load_after"] = os.getloadavg()
    except OSError:
        pass
    return record


def _row(backend: str, p: dict, i: int, status: str, **extra) -> dict:
    return {"backend": backend, "point": i, "sweep": p["sweep"], "batch": p["batch"], "width": p["width"],
            "flops": p["flops"], "params": p["params"], "status": status, **extra}


def _sweep_backend(cfg: SweepConfig, backend: str, dtype: str, pts: list[dict], progress) -> tuple[list[dict], bool]:
    """The backend's rows (one per point, in order) and whether Ctrl-C stopped it."""
    missing = backends.missing_requirements(backend)
    if missing:
        reason = f"not installed ({', '.join(missing)}): {backends.install_hint(backend)}"
        progress(f"  {backend}: skipped: {reason}")
        return [_row(backend, p, i, "skipped", reason=reason) for i, p in enumerate(pts)], False
    job = {"kind": "sweep", "backend": backend, "dtype": dtype, "device": cfg.device, "threads": cfg.threads,
           "fast": cfg.fast, "seed": cfg.seed, "rounds": cfg.rounds, "steps": cfg.steps, "min_round_s": cfg.min_round_s,
           "data_dir": cfg.data_dir, "points": [{**p, "spec": spec_to_dict(p["spec"])} for p in pts]}
    rows: dict[int, dict] = {}

    def on_line(msg: dict) -> None:
        i = msg.pop("point")
        p = pts[i]
        rows[i] = _row(backend, p, i, **msg)
        what = f"batch {p['batch']}" + (f", width {p['width']}" if p["sweep"] == "width" else "")
        t = msg.get("timing")
        progress(f"  {backend} {what}: " + (f"{t['median_s'] * 1e3:.3g} ms/step" if t else
                                             f"{msg['status']}: {msg.get('reason', '')}"))

    interrupted = False
    try:
        why = _run_job(job, subprocess_env(backend, dtype, cfg.threads), cfg.timeout, on_line)
    except KeyboardInterrupt:
        why, interrupted = "interrupted by Ctrl-C", True
    if why and not interrupted:
        progress(f"  {backend}: error: {why}")
    status = "interrupted" if interrupted else "error"
    return [rows.get(i) or _row(backend, p, i, status, reason=why or "no result") for i, p in enumerate(pts)], interrupted


def write(record: dict, results_dir: Path) -> Path:
    """``results_dir/raw/<run id>.json``, atomically, never overwriting."""
    from .results import _exclusive_replace, check_writable, new_run_id

    raw = check_writable(results_dir)
    while True:
        run_id = new_run_id(f"sweep-{record['model']}")
        path = raw / f"{run_id}.json"
        if not path.exists():
            break
    record["run_id"] = run_id
    tmp = raw / f".{run_id}.json.tmp"
    tmp.write_text(json.dumps(record, indent=1))
    _exclusive_replace(tmp, path)
    return path


# ----------------------------------------------------------------------------------------------- the worker side
def _peak(job: dict) -> dict:
    """Best rate of a square matrix multiply over a few sizes (each timed until it lasts 0.2 s)."""
    dtype = job["dtype"]
    if job["device"] == "cuda":
        try:
            import torch

            if not torch.cuda.is_available():
                raise ImportError("no CUDA device")
            dt = getattr(torch, dtype)
            mk = lambda n: torch.randn(n, n, device="cuda", dtype=dt)
            mm, sync, lib = torch.matmul, torch.cuda.synchronize, f"torch {torch.__version__} (cuBLAS)"
        except ImportError:
            import cupy

            mk = lambda n: cupy.random.standard_normal((n, n)).astype(dtype)
            mm, sync, lib = cupy.matmul, cupy.cuda.Stream.null.synchronize, f"cupy {cupy.__version__} (cuBLAS)"
        sizes = (1024, 2048, 4096, 8192)
    else:
        mk = lambda n: np.random.default_rng(n).standard_normal((n, n)).astype(dtype)
        mm, sync, lib = np.matmul, lambda: None, f"numpy {np.__version__} matmul"
        sizes = (128, 256, 512, 1024, 2048)
    rates = {}
    for n in sizes:
        a, b = mk(n), mk(n)
        mm(a, b)
        sync()
        reps, t = 0, time.perf_counter()
        while time.perf_counter() - t < 0.2:
            mm(a, b)
            reps += 1
            sync()
        rates[n] = 2 * n**3 * reps / (time.perf_counter() - t) / 1e9
    n = max(rates, key=rates.get)
    return {"gflops": rates[n], "n": n, "rates": rates, "library": lib, "dtype": dtype}


def _point(mod, job: dict, p: dict, data_cache: dict) -> dict:
    from backends.base import BuildOptions, Unsupported
    from harness import runner, timing
    from harness.worker import stack_batches
    from models.spec import init_weights

    spec = spec_from_dict(p["spec"])
    key = (spec.dataset, tuple(spec.input_shape))
    if key not in data_cache:
        _, x, y, _, _ = runner.load_data(spec, job["data_dir"])
        data_cache[key] = (x, y)
    x, y = data_cache[key]
    b = p["batch"]
    if b > len(x):
        return {"status": "skipped", "reason": f"batch {b} is larger than the data set ({len(x)} samples)"}
    order = runner.batch_order(len(x), b, job["steps"], job["seed"], spec.shuffle)
    xs, ys = stack_batches({"x": x, "y": y}, order, 0, job["steps"], spec.dtype, spec.loss.integer_labels)
    opts = BuildOptions(dtype=spec.dtype, device=job["device"], threads=job["threads"], fast=job["fast"],
                        seed=job["seed"])
    t = time.perf_counter()
    try:
        model = mod.Model(spec, init_weights(spec, job["seed"]), opts)
        model.sync()
    except Unsupported as e:
        return {"status": "skipped", "reason": str(e)}
    build_s = time.perf_counter() - t
    first_s = timing.timed_call(model, xs[:1], ys[:1])  # the first step: tracing / compilation where it happens
    t = timing.time_steps(model, xs, ys, rounds=job["rounds"], steps=job["steps"], min_round_s=job["min_round_s"])
    if not np.all(np.isfinite(np.asarray(model.get_weights()[0]))):
        return {"status": "diverged", "reason": "non-finite weights after the timed rounds", "timing": t}
    return {"status": "ok", "build_s": build_s, "first_step_s": first_s, "timing": t}


def pin_one_core(job: dict) -> None:
    """With one thread, the whole worker (every thread of every framework) is confined to one core: the thread
    variables do not bind XLA's CPU pool (measured here: a JAX matmul under --xla_cpu_multi_thread_eigen=false still
    keeps 2 cores busy), so without this JAX would time on two cores where the others time on one."""
    if job.get("threads") == 1 and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})


def reply_channel():
    """A worker's ``reply(obj)``: one JSON line on the stdout it was started with, while fd 1 and ``sys.stdout`` go
    to stderr from now on, so that a framework's chatter never interleaves with the replies."""
    stream = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def reply(obj: dict) -> None:
        stream.write(json.dumps(obj) + "\n")
        stream.flush()

    return reply


def worker_main(path: str) -> int:
    reply = reply_channel()
    job = json.loads(Path(path).read_text())
    pin_one_core(job)
    if job["kind"] == "peak":
        try:
            reply(_peak(job))
        except Exception as e:  # no GPU library: the sweep runs without a limit line
            reply({"gflops": None, "reason": f"{type(e).__name__}: {e}"})
        return 0
    try:
        mod = backends.load(job["backend"])
        mod.probe()
    except ImportError as e:
        for i in range(len(job["points"])):
            reply({"point": i, "status": "skipped",
                   "reason": f"not installed ({e}): {backends.install_hint(job['backend'])}"})
        return 0
    if job["device"] not in mod.devices():
        for i in range(len(job["points"])):
            reply({"point": i, "status": "skipped", "reason": f"no {job['device']} device for {job['backend']}"})
        return 0
    cache: dict = {}
    for i, p in enumerate(job["points"]):
        try:
            reply({"point": i, **_point(mod, job, p, cache)})
        except Exception as e:
            reply({"point": i, "status": "error", "reason": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}",
                   "traceback": traceback.format_exc()[-3000:]})
        gc.collect()
    return 0


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1]))


# ---------------------------------------------------------------------------------------------------- the tables
def _num(v: float) -> str:
    return f"{v:.0f}" if v >= 100 else f"{v:.3g}"


def ok_rows(record: dict) -> list[dict]:
    return [r for r in record["rows"] if r["status"] == "ok" and r.get("timing")]


def _frac(r: dict, peak: float | None) -> float | None:
    return None if not peak else r["flops"] / r["timing"]["median_s"] / 1e9 / peak


def crossovers(record: dict, kind: str = "batch") -> list[tuple[int, int, str, float]]:
    """The batch (or width) sweep cut into ranges with one fastest backend: (first value, last value, backend, the
    largest lead over the second fastest within the range, as a time ratio)."""
    var = "batch" if kind == "batch" else "width"
    rows = [r for r in ok_rows(record) if r["sweep"] == kind]
    out: list[list] = []
    for b in sorted({r[var] for r in rows}):
        sel = sorted((r for r in rows if r[var] == b), key=lambda r: r["timing"]["median_s"])
        lead = sel[1]["timing"]["median_s"] / sel[0]["timing"]["median_s"] if len(sel) > 1 else float("nan")
        if out and out[-1][2] == sel[0]["backend"]:
            out[-1][1] = b
            out[-1][3] = max(out[-1][3], lead)
        else:
            out.append([b, b, sel[0]["backend"], lead])
    return [tuple(o) for o in out]


def markdown(record: dict, plots: list[Path] = ()) -> str:
    from tabulate import tabulate

    cfg, pk = record["config"], record.get("peak") or {}
    peak = pk.get("gflops")
    m = record["machine"]
    lines = [
        "<!-- generated by `harness report` from results/raw/*.json: do not edit by hand -->",
        f"# Cost versus work: {record['model']} ({record['dtype']}, {record['device']})", "",
        f"- run: `{record.get('run_id')}`, {record['created_utc']}, took {record.get('duration_s', 0) / 60:.1f} min"
        + (" (**interrupted**: some points missing)" if record.get("interrupted") else ""),
        f"- machine: {m['cpu']}, {m['cores']} cores, {m['platform']}, Python {m['python']}; commit {record.get('commit')}",
        "- load average (1 min) before / after: " + " / ".join(f"{v[0]:.1f}" for v in
                                                               (record.get("load_before"), record.get("load_after"))
                                                               if v) + " (other jobs may share the machine)",
        f"- versions: {', '.join(f'{b} {v}' for b, v in record['versions'].items() if v)}",
        f"- settings: threads {cfg['threads'] or 'framework default'}, {cfg['rounds']} timed rounds of at least "
        f"{cfg['steps']} steps and {cfg['min_round_s']} s after a warm-up, seed {cfg['seed']}"
        + (", fast mode" if cfg.get("fast") else "") + "; every point builds a fresh model",
        f"- the hardware limit: {f'{peak:.1f} GFLOP/s' if peak else 'not measured'}"
        + (f", the best square matrix multiply ({pk['library']}, {pk['dtype']}, n = {pk['n']}) of n in "
           f"{', '.join(str(k) for k in pk['rates'])}, measured by this sweep with the same thread settings"
           if peak else f" ({pk.get('reason')})"),
        "- work: matmul / convolution FLOPs of one training step counted from the spec (forward, kernel gradients, "
        "input gradients but the first layer's; activations, loss and optimizer not counted): `harness/sweep.py`",
        "- timing: as `harness compare` times (`harness/timing.py`): batches staged on the device untimed, median and "
        "IQR over the timed rounds, device synchronised before every clock read", ""]
    runs = ok_rows(record)
    bad = [r for r in record["rows"] if r["status"] != "ok"]
    for kind, title, var in (("batch", "Batch sweep", "batch"), ("width", "Width sweep", "width")):
        sel = [r for r in runs if r["sweep"] == kind]
        if not sel:
            continue
        fixed = (f"hidden width {sel[0]['width']}" if kind == "batch" else f"batch {sel[0]['batch']}")
        lines += [f"## {title} ({fixed})", ""]
        if kind == "batch":
            lines += ["Per-sample time (µs) = median step time / batch size; lower is better. The fastest backend "
                      "per batch size is in bold.", ""]
        names = sorted({r["backend"] for r in sel})
        keys = sorted({r[var] for r in sel})
        table = []
        for k in keys:
            at = {r["backend"]: r for r in sel if r[var] == k}
            best = min(at, key=lambda b: at[b]["timing"]["median_s"])
            cells = []
            for b in names:
                if b not in at:
                    cells.append("-")
                    continue
                v = at[b]["timing"]["median_s"] * 1e6 / (at[b]["batch"] if kind == "batch" else 1)
                cells.append(f"**{_num(v)}**" if b == best else _num(v))
            table.append([k, f"{at[best]['flops'] / 1e6:.3g}"] + cells)
        unit = "µs per sample" if kind == "batch" else "µs per step"
        lines.append(tabulate(table, headers=[var, "MFLOP/step"] + [f"{b} ({unit})" for b in names],
                              tablefmt="github"))
        lines.append("")
    for kind in ("batch", "width"):
        cross = crossovers(record, kind)
        if cross:
            lines += [f"## Crossovers ({kind} sweep)", "",
                      f"The fastest backend per range of {kind} values, and its largest lead over the second fastest "
                      f"there (a lead below about 1.1x is within the noise of a shared machine):", ""]
            lines += [f"- {kind} {a}" + (f"-{b}" if b != a else "") + f": **{name}**, up to {lead:.2f}x ahead"
                      for a, b, name, lead in cross]
            lines.append("")
    if runs:
        lines += ["## Every point", "",
                  "`% of limit` = (FLOPs per step / median step time) / the measured matrix-multiply rate. `cores busy` = "
                  "CPU seconds of the worker's threads per wall second over the timed rounds (with one thread every "
                  "worker is confined to one core: `harness.sweep.pin_one_core`).", ""]
        table = []
        for r in sorted(runs, key=lambda r: (r["sweep"], r["backend"], r["batch"], r["width"] or 0)):
            t, f = r["timing"], _frac(r, peak)
            table.append([r["sweep"], r["backend"], r["batch"], r["width"], f"{r['flops'] / 1e6:.3g}",
                          f"{t['median_s'] * 1e3:.3g} ± {t['iqr_s'] * 1e3:.2g}",
                          f"{r['flops'] / t['median_s'] / 1e9:.3g}", "-" if f is None else f"{100 * f:.3g}%",
                          f"{t['cores_busy']:.2g}" if "cores_busy" in t else "-",
                          f"{r['build_s'] + r['first_step_s']:.3g}"])
        lines.append(tabulate(table, headers=["sweep", "backend", "batch", "width", "MFLOP/step",
                                              "ms/step (median ± IQR)", "GFLOP/s", "% of limit", "cores busy",
                                              "build + compile s"],
                              tablefmt="github"))
        lines.append("")
    if bad:
        lines += ["## Points without a time", ""]
        seen = set()
        for r in bad:
            k = (r["backend"], r["status"], r.get("reason"))
            if k not in seen:
                seen.add(k)
                n = sum(1 for x in bad if (x["backend"], x["status"], x.get("reason")) == k)
                lines.append(f"- {r['backend']}: {r['status']} ({n} points): {r.get('reason')}")
        lines.append("")
    lines += [f"![{p.stem}]({p.name})" for p in plots]
    return "\n".join(lines).rstrip() + "\n"


def newest_records(records: list[dict]) -> list[dict]:
    """The newest sweep record per (model, device, dtype, fast mode, threads): one report each."""
    newest: dict[tuple, dict] = {}
    for rec in records:  # oldest first
        if rec.get("kind") == "sweep":
            newest[stem(rec)] = rec
    return list(newest.values())


def stem(record: dict) -> str:
    return f"sweep-{record['model']}" + ("" if record["device"] == "cpu" else f"-{record['device']}") + (
        "" if record["dtype"] == "float32" else f"-{record['dtype']}") + ("-fast" if record["config"].get("fast") else "") + (
        "" if record["config"].get("threads") == 1 else f"-threads-{record['config'].get('threads') or 'default'}")


def write_report(record: dict, results_dir: Path, plots: bool = True) -> list[Path]:
    """``results/<stem>.md`` and its two plots."""
    from . import plots as plotting

    out_dir = Path(results_dir)
    made = []
    if plots:
        made = [p for p in (plotting.sweep_per_sample(record, out_dir / f"{stem(record)}-batch.png"),
                            plotting.sweep_flops(record, out_dir / f"{stem(record)}-flops.png")) if p]
    md = out_dir / f"{stem(record)}.md"
    tmp = md.with_suffix(".md.tmp")
    tmp.write_text(markdown(record, made))
    tmp.replace(md)
    return made + [md]
