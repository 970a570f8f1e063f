"""The subprocess side: run one backend on a job prepared by the parent, write plain NumPy results.

``python -m harness.worker JOB_DIR`` reads ``JOB_DIR/job.json`` (the spec in its JSON form, options, runs) and
``JOB_DIR/data.npz`` (canonical initial weights, the data, the batch order, the probe batch) and, for each run, writes
``JOB_DIR/run-<i>.npz`` and ``JOB_DIR/run-<i>.json`` as soon as that run is finished, so that a crash in a later run
keeps the earlier ones.

Only this process imports the backend's framework.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

import numpy as np


def _atomic_write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    os.replace(tmp, path)


def _atomic_write_npz(path: Path, arrays: dict) -> None:
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


INVARIANCE_SAMPLES = 10


def stack_batches(data, order, a, b, dtype, integer_labels):
    """Batches ``a..b-1`` of ``order`` stacked: x (b-a, B, ...) in ``dtype``, y as int64 labels or ``dtype`` targets."""
    idx = order[a:b]
    x = data["x"][idx].astype(dtype)
    y = data["y"][idx]
    return x, (y.astype(np.int64) if integer_labels else y.astype(dtype))


def _batch(data, order, k, dtype, integer_labels):
    xs, ys = stack_batches(data, order, k, k + 1, dtype, integer_labels)
    return xs[0], ys[0]


def run_one(mod, spec, weights, data, run: dict, options) -> tuple[dict, dict]:
    """Train one backend for ``run['steps']`` steps at one batch size; returns (arrays, metadata)."""
    from backends.base import BuildOptions

    # a run may override the job's dtype and options (the oracle's rounding variants run in the compared dtype)
    opts = BuildOptions(**{**options, "device": run["device"], "dtype": run.get("dtype", options["dtype"]),
                           "seed": run["seed"], "extra": {**options.get("extra", {}), **run.get("extra", {})}})
    dtype = np.dtype(opts.dtype)
    il = spec.loss.integer_labels
    order = data[f"seed{run['seed']}/order_{run['batch_size']}"]
    steps = int(run["steps"])
    check_every = int(run["check_every"])
    probe_x = data["probe_x"].astype(dtype)
    arrays: dict[str, np.ndarray] = {}
    meta: dict = {"batch_size": run["batch_size"], "device": run["device"], "steps": steps}

    t0 = time.perf_counter()
    model = mod.Model(spec, weights, opts)
    model.sync()
    meta["build_s"] = time.perf_counter() - t0
    # what a model cannot give (a user's file without gradients() or predict(): harness.usercode) is never asked for;
    # the agreement engine compares what is there
    skip = dict(getattr(model, "not_checked", None) or {})
    if skip:
        meta["not_checked"] = skip
    has_grads, has_pred = "gradients" not in skip, "predictions" not in skip
    if has_pred:
        arrays["pred_init"] = np.asarray(model.predict(probe_x), dtype=np.float64)

    # batch-size invariance at the initial weights, on the first INVARIANCE_SAMPLES samples of the first batch (the
    # property does not depend on how many; one call per sample would dominate a long sweep): per-sample gradients
    # reduced per the spec vs that sub-batch's gradient, batch-1 predictions vs the rows of the batch prediction
    x0, y0 = _batch(data, order, 0, dtype, il)
    k = min(len(x0), INVARIANCE_SAMPLES) if run.get("invariance", True) else 0  # the diagnosis's reruns skip it
    coupled = invariance_exemption(spec)
    if coupled:
        meta["invariance_grads_skipped"] = coupled
    if k > 1 and not coupled and has_grads:
        per = [model.gradients(x0[i : i + 1], y0[i : i + 1])[1] for i in range(k)]
        combined = [np.sum([np.asarray(p[j], np.float64) for p in per], axis=0) for j in range(len(weights))]
        if spec.loss.reduction == "mean":
            combined = [c / k for c in combined]
        batch = model.gradients(x0[:k], y0[:k])[1]
        for j, (c, g) in enumerate(zip(combined, batch)):
            arrays[f"inv_grad/{j}"] = c
            arrays[f"inv_batch_grad/{j}"] = np.array(g, np.float64)
    if k > 1 and has_pred:  # inference mode holds for every layer: a prediction never depends on the rest of its batch
        rows = [np.asarray(model.predict(probe_x[i : i + 1]), np.float64) for i in range(k)]
        arrays["inv_pred_rows"] = np.concatenate(rows)

    # the trajectory: gradients at step 0, 1, 10 and every check_every-th step; weights after 1, 10 and all steps
    grad_steps = sorted({s for s in (0, 1, 10) if s < steps} | set(range(0, steps, check_every)))
    weight_steps = sorted({s for s in (1, 10, steps) if s <= steps})
    marks = sorted(set(grad_steps) | set(weight_steps) | {steps})
    losses = np.empty(steps)
    step_times = []
    done = 0
    for mark in marks:
        if mark > done:
            xs, ys = stack_batches(data, order, done, mark, dtype, il)
            model.sync()
            t = time.perf_counter()
            losses[done:mark] = model.train_steps(xs, ys)
            model.sync()
            step_times.append((mark - done, time.perf_counter() - t))
            done = mark
            if not np.all(np.isfinite(losses[:done])):
                bad = int(np.argmax(~np.isfinite(losses[:done])))
                meta["diverged_at"] = bad
                break
        if mark in weight_steps:
            for j, w in enumerate(model.get_weights()):
                arrays[f"weights/{mark}/{j}"] = np.array(w, np.float64)  # copy: a backend may hand out views
            for j, w in enumerate(model.get_state()):
                arrays[f"state/{mark}/{j}"] = np.array(w, np.float64)
        if mark in grad_steps and mark < steps and has_grads:
            loss, grads = model.gradients(*_batch(data, order, mark, dtype, il))
            arrays[f"grad_loss/{mark}"] = np.float64(loss)
            for j, g in enumerate(grads):
                arrays[f"grads/{mark}/{j}"] = np.array(g, np.float64)
    arrays["losses"] = losses[:done]
    meta["steps_done"] = done
    if has_pred:  # before the replay: a user's module-level state belongs to the newest model built
        arrays["pred_final"] = np.asarray(model.predict(probe_x), dtype=np.float64)
    if run.get("repeat") and done == steps:
        meta["determinism"] = repeat_check(mod, spec, weights, data, order, marks, opts, arrays, steps)
    meta["segments"] = step_times
    meta["info"] = getattr(model, "info", {})

    timing = run.get("timing")
    if timing and done == steps:
        from harness.timing import time_steps

        xs, ys = stack_batches(data, order, 0, min(steps, timing["steps"]), dtype, il)
        meta["timing"] = time_steps(model, xs, ys, rounds=timing["rounds"], steps=timing["steps"])
    return arrays, meta


def invariance_exemption(spec) -> str | None:
    """Why per-sample gradients cannot add up to the batch's in training mode, or None where they must."""
    why = []
    if spec.couples_batch:
        why.append(f"{', '.join(type(spec.layers[i]).__name__ + str(i) for i in spec.couples_batch)}: each sample is "
                   f"normalised with its batch's statistics")
    if spec.random_layers:
        why.append(f"{', '.join(type(spec.layers[i]).__name__ + str(i) for i in spec.random_layers)}: masks are drawn "
                   f"per batch")
    return ("gradient batch-size invariance not checked: " + "; ".join(why)) if why else None


def repeat_check(mod, spec, weights, data, order, marks, opts, arrays, steps) -> dict:
    """Replay the trajectory with a fresh model (same segments): are losses and final weights bit-identical?"""
    dtype = np.dtype(opts.dtype)
    model = mod.Model(spec, [w.copy() for w in weights], opts)
    losses = []
    done = 0
    for mark in marks:
        if mark > done:
            xs, ys = stack_batches(data, order, done, mark, dtype, spec.loss.integer_labels)
            losses.append(np.asarray(model.train_steps(xs, ys)))
            done = mark
    losses = np.concatenate(losses)
    final = [np.asarray(w, np.float64) for w in [*model.get_weights(), *model.get_state()]]
    n_w = len(spec.param_names())
    ref = [arrays[f"weights/{steps}/{j}"] for j in range(n_w)] + [arrays[f"state/{steps}/{j}"]
                                                                  for j in range(len(final) - n_w)]
    loss_diff = float(np.max(np.abs(losses - arrays["losses"])))
    weight_diff = max(float(np.max(np.abs(a - b))) for a, b in zip(final, ref))
    return {"bit_identical": bool(loss_diff == 0 and weight_diff == 0), "max_loss_diff": loss_diff,
            "max_weight_diff": weight_diff}


def accuracy(spec, pred: np.ndarray, y: np.ndarray) -> float:
    """Fraction correct: argmax for softmax, threshold 0.5 for sigmoid and for the 4-3-1's sigmoid output."""
    if spec.loss.integer_labels:
        return float(np.mean(np.argmax(pred, axis=-1) == y))
    return float(np.mean((pred > 0.5) == (y > 0.5)))


def _predict_chunked(model, x, dtype, chunk=1000):
    return np.concatenate([np.asarray(model.predict(x[i : i + chunk].astype(dtype)), np.float64)
                           for i in range(0, len(x), chunk)])


def train(mod, spec, weights, data, job) -> None:
    """Full training; one JSON line per progress event on stdout (the parent draws the progress bar)."""
    from backends.base import BuildOptions

    opts = BuildOptions(**job["options"])
    dtype = np.dtype(opts.dtype)
    il = spec.loss.integer_labels
    model = mod.Model(spec, weights, opts)
    x, y = data["x"], data["y"]
    b = job["batch_size"]
    per_epoch = len(x) // b
    chunk = max(1, per_epoch // 20)
    for epoch in range(job["epochs"]):
        order = data[f"epoch_{epoch}"][: per_epoch * b].reshape(per_epoch, b)
        t = time.perf_counter()
        losses = []
        for a in range(0, per_epoch, chunk):
            xs, ys = stack_batches({"x": x, "y": y}, order, a, min(a + chunk, per_epoch), dtype, il)
            losses.append(np.asarray(model.train_steps(xs, ys)))
            print(json.dumps({"event": "progress", "epoch": epoch, "step": min(a + chunk, per_epoch),
                              "of": per_epoch}), flush=True)
        model.sync()
        elapsed = time.perf_counter() - t
        losses = np.concatenate(losses)
        line = {"event": "epoch", "epoch": epoch, "loss": float(np.mean(losses)), "time_s": elapsed,
                "train_acc": accuracy(spec, _predict_chunked(model, x, dtype), y)}
        if "x_test" in data:
            line["test_acc"] = accuracy(spec, _predict_chunked(model, data["x_test"], dtype), data["y_test"])
        if not np.all(np.isfinite(losses)):
            line["diverged_at"] = int(epoch * per_epoch + np.argmax(~np.isfinite(losses)))
            print(json.dumps(line), flush=True)
            return
        print(json.dumps(line), flush=True)
    np.savez(Path(job["out"]), *[np.asarray(w) for w in model.get_weights()])


def environment_flags() -> dict:
    keys = ("TF_ENABLE_ONEDNN_OPTS", "TF_DETERMINISTIC_OPS", "OMP_NUM_THREADS", "KERAS_BACKEND", "JAX_ENABLE_X64",
            "XLA_FLAGS", "CUDA_VISIBLE_DEVICES", "DLCOMPARE_ARRAY_MODULE", "JAX_PLATFORMS")
    return {k: os.environ.get(k) for k in keys}


def _exit_with_parent(parent: int, every_s: float = 1.0) -> None:
    """End this worker when the process that started it is gone (a Ray task killed with its worker process, a parent
    killed by SIGKILL): the worker runs in its own session, so nothing else would stop it."""
    import threading

    def watch() -> None:
        while True:
            time.sleep(every_s)
            if os.getppid() != parent:
                os._exit(3)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    _exit_with_parent(os.getppid())
    job_dir = Path(argv[0])
    job = json.loads((job_dir / "job.json").read_text())
    status_path = job_dir / "worker.json"
    import backends
    from backends.base import Unsupported
    from harness.status import Status

    head = {"backend": job["backend"], "python": platform.python_version(), "pid": os.getpid(),
            "env": environment_flags()}
    user_file = backends.get_info(job["backend"]).path  # a user's own file (harness.usercode), else None
    try:
        mod = backends.load(job["backend"])
        head["version"] = mod.probe()
        head["devices"] = mod.devices()
    except Exception as e:
        if user_file:  # an error in the user's file as it loads: every run is an error row with the user's lines
            from harness.usercode import error_meta

            _atomic_write_json(status_path, head)
            meta = error_meta(e, user_file)
            for i, run in enumerate(job["runs"]):
                _atomic_write_json(job_dir / f"run-{i}.json", {**meta, "batch_size": run["batch_size"],
                                                               "device": run["device"], "seed": run["seed"]})
            return 0
        if not isinstance(e, ImportError):
            raise
        head.update(status=Status.SKIPPED, reason=f"not installed ({e}); {backends.install_hint(job['backend'])}")
        _atomic_write_json(status_path, head)
        return 0
    _atomic_write_json(status_path, head)

    with np.load(job_dir / "data.npz") as f:
        data = {k: f[k] for k in f.files}
    if job.get("kind") == "hazards":
        from harness.hazards import work

        work(mod, job, job_dir, data)
        return 0
    from models.spec import spec_from_dict

    spec = spec_from_dict(job["spec"])
    n_params = len(spec.param_shapes())
    if job.get("kind") == "train":
        train(mod, spec, [data[f"w/{j}"] for j in range(n_params)], data, job)
        return 0
    for i, run in enumerate(job["runs"]):
        out = job_dir / f"run-{i}"
        try:
            if run["device"] not in head["devices"]:
                raise Unsupported(f"no {run['device'].upper()} device" if run["device"] == "cuda"
                                  else f"device {run['device']} not available")
            weights = [data[f"seed{run['seed']}/w/{j}"].copy() for j in range(n_params)]
            arrays, meta = run_one(mod, spec, weights, data, run, job["options"])
            meta["status"] = Status.DIVERGED if "diverged_at" in meta else Status.OK
        except Unsupported as e:
            arrays, meta = {}, {"status": Status.SKIPPED, "reason": str(e)}
        except Exception as e:  # a crashing backend becomes an error row, never a crash of the harness
            arrays = {}
            if user_file:  # the user's own lines, the exception and a hint, not the harness's frames
                from harness.usercode import error_meta

                meta = error_meta(e, user_file, spec, run["batch_size"])
            else:
                meta = {"status": Status.ERROR, "reason": f"{type(e).__name__}: {e}",
                        "traceback": traceback.format_exc()}
        meta.update(batch_size=run["batch_size"], device=run["device"], seed=run["seed"])
        if arrays:
            _atomic_write_npz(out.with_suffix(".npz"), arrays)
        _atomic_write_json(out.with_suffix(".json"), meta)
    return 0


if __name__ == "__main__":
    sys.exit(main())
