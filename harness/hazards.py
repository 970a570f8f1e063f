"""The porting-hazards atlas: each framework default that silently changes the numbers, measured one at a time.

For every probe (a minimal network built around one hazard, :data:`PROBES`) every backend trains twice in its own
process from the same initial weights on the same batches: aligned (the spec) and native with only that probe's
default applied (``BuildOptions.extra["native_only"] = [key]``, see ``backends.base.NATIVE_KEYS``).  The NumPy float64
oracle trains the spec.  The effect of a default is the native run's distance from the oracle: the loss at the initial
weights (forward hazards), the weights after one update (optimizer hazards show there, in closed form), and the loss,
weights and inference predictions after the probe's last step; the aligned run's distance is printed beside it as the
floor, so that an effect is never rounding.  What each framework's default *is* comes from the backend itself
(``info["native_settings"]``), never from this module.

``harness hazards`` writes the raw record (``results/raw/<run id>.json``, kind "hazards") and renders
``results/hazards.md`` from it; ``harness hazards --render`` re-renders from the newest record.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np

import backends
from models.spec import (
    SGD,
    Activation,
    Adagrad,
    Adam,
    AdamW,
    AveragePooling2D,
    BatchNorm,
    ClipNorm,
    Conv2D,
    Dense,
    Flatten,
    Init,
    LayerNorm,
    Loss,
    ModelSpec,
    RMSprop,
    StepDecay,
    f32,
    init_weights,
    spec_from_dict,
    spec_to_dict,
)

from .runner import UserError, subprocess_env

STEPS = 100
BATCH = 16
SAMPLES = 64
SEED = 0
DEFAULT_BACKENDS = ("tf1", "tf2", "keras", "keras-jax", "keras-torch", "torch", "jax")


@dataclass(frozen=True)
class Probe:
    """One hazard: the NATIVE_KEYS key it switches on, a minimal spec in which it shows, and how to align it."""

    name: str
    key: str
    spec: ModelSpec
    align: str  # the one-line setting that aligns it (per framework where they differ)
    dtype: str = "float64"
    steps: int = STEPS


def _spec(name, input_shape, layers, loss=None, optimizer=None, **kw) -> ModelSpec:
    s = ModelSpec(name=name, description=f"hazards probe: {name}", input_shape=input_shape, layers=tuple(layers),
                  loss=loss or Loss("softmax_crossentropy", "mean"), optimizer=optimizer or SGD(0.05),
                  init=Init("glorot_uniform", "zeros"), dataset="synthetic", batch_sizes=(BATCH,), epochs=1,
                  expected_params=0, dtype="float64", shuffle=True, **kw)
    return replace(s, expected_params=s.param_count())


def _mlp(name, hidden=(), out=3, **kw) -> ModelSpec:
    return _spec(name, (6,), [Dense(8), *hidden, Dense(out)], **kw)


_RMS = RMSprop(f32(1e-3))
_ADAGRAD = Adagrad(f32(1e-2))
_DECAY = StepDecay(25, f32(0.1))

PROBES: tuple[Probe, ...] = (
    Probe("Conv2D 'same' at stride 2 (8x8 input, 3x3 kernel)", "conv_same_padding",
          _spec("conv_same", (8, 8, 2), [Conv2D(4, (3, 3), "relu", "same", strides=(2, 2)), Flatten(), Dense(3)]),
          "torch: F.pad(x, (0, 1, 0, 1)) then padding=0 (TF puts the odd row/column at the bottom/right)"),
    Probe("AveragePooling2D 'same' (3x3, stride 2): padded zeros in the mean", "avgpool_count_pad",
          _spec("avgpool_same", (7, 7, 2), [Conv2D(4, (3, 3), "relu"), AveragePooling2D(3, 2, "same"), Flatten(),
                                            Dense(3)]),
          "torch: nn.AvgPool2d(..., count_include_pad=False); flax: avg_pool(..., count_include_pad=False)"),
    Probe("LayerNorm epsilon", "layernorm_epsilon", _mlp("layernorm", [LayerNorm(), Activation("tanh")]),
          "torch: nn.LayerNorm(C, eps=1e-3); flax: nn.LayerNorm(epsilon=1e-3)"),
    Probe("leaky_relu negative slope", "leaky_relu_slope", _mlp("leaky_relu", [Activation("leaky_relu")]),
          "torch: F.leaky_relu(x, 0.2); jax.nn.leaky_relu(x, 0.2); keras.layers.LeakyReLU(negative_slope=0.2)"),
    Probe("gelu: exact (erf) or tanh approximation", "gelu_approximation", _mlp("gelu", [Activation("gelu")]),
          "jax.nn.gelu(x, approximate=False); keras.ops.gelu(x, approximate=False)"),
    Probe("MSE with (N,) targets against an (N, 1) output", "mse_broadcast",
          _mlp("mse", [Activation("tanh")], out=1, loss=Loss("mse", "mean")),
          "torch: nn.MSELoss()(out, y.view(-1, 1)) (same shapes; torch only warns)"),
    Probe("sparse categorical crossentropy on softmax probabilities", "sparse_cce_probabilities",
          _spec("cce_probs", (6,), [Dense(8, "tanh"), Dense(3, "softmax")],
                loss=Loss("sparse_categorical_crossentropy", "mean")),
          "torch: nn.NLLLoss()(torch.log(p), y) (CrossEntropyLoss wants logits); better: logits + from_logits=True"),
    Probe("class weights (1, 2, 0.5): the weighted mean's denominator", "class_weight_denominator",
          _mlp("class_weights", [Activation("tanh")], loss=Loss("softmax_crossentropy", "mean", (1.0, 2.0, 0.5))),
          "torch: CrossEntropyLoss(weight=w, reduction='none')(out, y).mean() (Keras divides by N)"),
    Probe("SGD momentum 0.9, lr x0.1 every 25 updates", "momentum_form",
          _mlp("momentum", [Activation("tanh")], optimizer=SGD(0.05, f32(0.9)), schedule=_DECAY),
          "identical at a constant lr; after an lr change only the same form agrees (Keras: v = mu*v - lr*g)"),
    Probe("SGD Nesterov momentum 0.9, lr x0.1 every 25 updates", "momentum_form",
          _mlp("nesterov", [Activation("tanh")], optimizer=SGD(0.05, f32(0.9), nesterov=True), schedule=_DECAY),
          "as momentum: the form matters after an lr change"),
    Probe("RMSprop decay (rho / alpha)", "rmsprop_rho", _mlp("rmsprop_rho", [Activation("tanh")], optimizer=_RMS),
          "torch: RMSprop(alpha=0.9); the default 0.99 averages ten times longer"),
    Probe("RMSprop epsilon (value, inside or outside the square root)", "rmsprop_epsilon",
          _mlp("rmsprop_eps", [Activation("tanh")], optimizer=_RMS),
          "torch: eps outside sqrt cannot be moved inside; use a hand-written update or eps small against sqrt(v)"),
    Probe("RMSprop initial accumulator (TF1: 1.0)", "rmsprop_accumulator",
          _mlp("rmsprop_acc", [Activation("tanh")], optimizer=_RMS),
          "TF1: a 1.0 start makes the first updates ~30x smaller; tf.keras / Keras 3 start at 0"),
    Probe("Adagrad initial accumulator", "adagrad_accumulator",
          _mlp("adagrad_acc", [Activation("tanh")], optimizer=_ADAGRAD),
          "torch: Adagrad(initial_accumulator_value=0.1)"),
    Probe("Adagrad epsilon (value, inside or outside the square root)", "adagrad_epsilon",
          _mlp("adagrad_eps", [Activation("tanh")], optimizer=_ADAGRAD),
          "torch: eps outside sqrt; set eps=1e-7 for the value, the placement differs by eps/sqrt(a)"),
    Probe("AdamW default weight decay", "adamw_weight_decay",
          _mlp("adamw_wd", [Activation("tanh")], optimizer=AdamW(f32(1e-3))),
          "pass weight_decay explicitly: torch 1e-2, Keras 4e-3, optax 1e-4 by default"),
    Probe("AdamW decay times the learning rate or not", "adamw_decay_form",
          _mlp("adamw_form", [Activation("tanh")], optimizer=AdamW(f32(1e-3))),
          "torch / Keras / optax all multiply by lr; the paper's (and old tf-addons') form does not"),
    Probe("Adam epsilon value", "adam_epsilon", _mlp("adam_eps", [Activation("tanh")], optimizer=Adam()),
          "torch: Adam(eps=1e-7); optax.adam(eps=1e-7)"),
    Probe("Adam epsilon added to sqrt(v) or sqrt(v_hat)", "adam_convention",
          _mlp("adam_conv", [Activation("tanh")], optimizer=Adam()),
          "torch: eps = eps_hat * sqrt(1 - beta2^t) per step, or write the update by hand"),
    Probe("Adam 1 - beta from a Python double (float32 runs)", "adam_one_minus_beta",
          _mlp("adam_beta", [Activation("tanh")], optimizer=Adam()),
          "Keras: no setting; compare float32 runs with that tolerance", dtype="float32"),
    Probe("L2 penalty 1e-3 on the kernels", "l2_regularization",
          _mlp("l2", [Activation("tanh")], loss=Loss("softmax_crossentropy", "mean", l2=f32(1e-3))),
          "torch: weight_decay=2e-3 on kernels only (param groups); TF1: 2 * l * tf.nn.l2_loss(w)"),
    Probe("gradient clipping at norm 0.1: global or per tensor", "clip_scope",
          _mlp("clip_scope", [Activation("tanh")], clip=ClipNorm(f32(0.1), "global")),
          "Keras: global_clipnorm=0.1 (clipnorm clips each variable alone)"),
    Probe("gradient clipping at norm 0.1: epsilon in the norm", "clip_epsilon",
          _mlp("clip_eps", [Activation("tanh")], clip=ClipNorm(f32(0.1), "global")),
          "torch: clip_grad_norm_ divides by norm + 1e-6 (no setting)"),
    Probe("step learning-rate schedule through the framework's scheduler", "lr_schedule",
          _mlp("schedule", [Activation("tanh")], optimizer=SGD(0.05), schedule=_DECAY),
          "step the scheduler per update (torch StepLR per batch, Keras ExponentialDecay(staircase=True))"),
    Probe("sum of squared errors written with the framework's loss", "loss_form",
          _mlp("sse_form", [Activation("tanh")], loss=Loss("sse", "sum"), optimizer=SGD(0.002)),
          "Keras: a custom loss ops.sum(ops.square(y - out)) (MeanSquaredError means over the outputs and the "
          "batch); torch: nn.MSELoss(reduction='sum')"),
    Probe("binary cross-entropy on sigmoid probabilities", "loss_form",
          _mlp("bce_form", [Activation("tanh")], out=1, loss=Loss("binary_crossentropy", "mean")),
          "from_logits=True / nn.BCEWithLogitsLoss: no clipping or clamping"),
    Probe("softmax cross-entropy on softmax probabilities", "loss_form",
          _mlp("cce_form", [Activation("tanh")]),
          "Keras: a linear last layer and SparseCategoricalCrossentropy(from_logits=True)"),
    Probe("BatchNorm momentum", "batchnorm_momentum", _mlp("bn_momentum", [BatchNorm(), Activation("relu")]),
          "torch: BatchNorm1d(momentum=0.01) is Keras' 0.99"),
    Probe("BatchNorm epsilon", "batchnorm_epsilon", _mlp("bn_epsilon", [BatchNorm(), Activation("relu")]),
          "torch: BatchNorm1d(eps=1e-3)"),
    Probe("BatchNorm moving variance: biased or Bessel-corrected", "batchnorm_variance",
          _mlp("bn_variance", [BatchNorm(), Activation("relu")]),
          "torch: no setting (always unbiased); set the spec's unbiased_moving_variance to compare"),
    Probe("learning rate held as a float32 constant", "lr_precision",
          _mlp("lr_precision", [Activation("tanh")], optimizer=SGD(0.05)),
          "TF1: pass the learning rate as a float64 tensor"),
    Probe("default matmul / conv precision", "matmul_precision",
          _spec("precision", (6, 6, 2), [Conv2D(4, (3, 3), "tanh"), Flatten(), Dense(3)]),
          "JAX: jax.default_matmul_precision('highest'); torch CUDA: allow_tf32 = False"),
)


def probe_data(spec: ModelSpec, seed: int = SEED, samples: int = SAMPLES) -> dict[str, np.ndarray]:
    """Synthetic inputs (standard normal), targets (classes from a fixed random linear teacher, or uniform values),
    and the batch order of every step (a new permutation per epoch): the same for every backend."""
    rng = np.random.default_rng([seed, 0x4A2])
    x = rng.normal(size=(samples, *spec.input_shape))
    k = spec.n_outputs
    teacher = rng.normal(size=(int(np.prod(spec.input_shape)), max(k, 2)))
    scores = x.reshape(samples, -1) @ teacher
    if spec.loss.integer_labels:
        y = scores.argmax(axis=1).astype(np.int64)
    elif spec.loss.kind == "binary_crossentropy":
        y = (scores[:, :k] > 0).astype(np.float64)
    else:
        y = np.tanh(scores[:, :k] / math.sqrt(scores.shape[1]))
    per_epoch = samples // BATCH
    epochs = -(-STEPS // per_epoch)
    order = np.concatenate([rng.permutation(samples)[: per_epoch * BATCH].reshape(per_epoch, BATCH)
                            for _ in range(epochs)])
    return {"x": x, "y": y, "order": order, "probe_x": x[:32]}


# ------------------------------------------------------------------------------------------------ in the worker
def _train(mod, spec: ModelSpec, weights, data, mode: str, key: str, dtype: str, steps: int) -> dict:
    from backends.base import BuildOptions

    extra = {"native_only": [key]} if mode == "native" else {}
    model = mod.Model(spec, [w.copy() for w in weights], BuildOptions(dtype=dtype, mode=mode, seed=SEED, extra=extra))
    dt = np.dtype(dtype)
    il = spec.loss.integer_labels
    px = data["probe_x"].astype(dt)
    out = {"pred_init": model.predict(px)}
    losses = []
    for t in range(steps):
        idx = data["order"][t]
        x, y = data["x"][idx].astype(dt), data["y"][idx]
        losses.append(float(model.train_step(x, y if il else y.astype(dt))))
        if t == 0:
            out["weights_1"] = model.get_weights()
        if not math.isfinite(losses[-1]):
            break
    out.update(losses=losses, weights_n=model.get_weights(), pred_n=model.predict(px))
    info = getattr(model, "info", {})
    arrays = {}
    for k, v in out.items():
        if k == "losses":
            arrays[k] = v
        elif isinstance(v, list):  # a list of weight arrays
            arrays[k] = [np.asarray(a, np.float64).tolist() for a in v]
        else:
            arrays[k] = np.asarray(v, np.float64).tolist()
    return {"arrays": arrays,
            "native_settings": dict(info.get("native_settings", {})),
            "native_differences": list(info.get("native_differences", [])) if mode == "native" else [],
            "status": "ok"}


def work(mod, job: dict, job_dir: Path, data: dict) -> None:
    """The worker side (``python -m harness.worker`` with a job of kind "hazards"): every probe, aligned and native,
    one result file per probe written atomically as it finishes."""
    from backends.base import Unsupported

    for i, p in enumerate(job["probes"]):
        spec = spec_from_dict(p["spec"])
        d = {k.split("/", 1)[1]: v for k, v in data.items() if k.startswith(f"{i}/")}
        weights = [d[f"w/{j}"] for j in range(len(spec.param_shapes()))]
        res = {}
        for mode in (("aligned",) if job.get("oracle") else ("aligned", "native")):
            try:
                res[mode] = _train(mod, spec, weights, d, mode, p["key"], p["dtype"], p["steps"])
            except Unsupported as e:
                res[mode] = {"status": "skipped", "reason": str(e)}
            except Exception as e:  # a crash is this probe's error row, never the whole atlas's
                res[mode] = {"status": "error", "reason": f"{type(e).__name__}: {e}",
                             "traceback": traceback.format_exc()[-2000:]}
        tmp = job_dir / f".probe-{i}.json.tmp"
        tmp.write_text(json.dumps(res))
        os.replace(tmp, job_dir / f"probe-{i}.json")


# ------------------------------------------------------------------------------------------------ in the parent
def _scaled(a, b) -> float:
    """max |a - b| / max |b| over lists of arrays (b: the oracle's); inf when shapes differ or values are not finite."""
    a = [np.asarray(v, np.float64) for v in (a if isinstance(a, list) else [a])]
    b = [np.asarray(v, np.float64) for v in (b if isinstance(b, list) else [b])]
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)):
        return math.inf
    num = max(float(np.max(np.abs(x - y))) if x.size else 0.0 for x, y in zip(a, b))
    den = max(float(np.max(np.abs(y))) if y.size else 0.0 for y in b)
    return num / den if den > 0 and math.isfinite(num) else (0.0 if num == 0 else math.inf)


def effects(run: dict, oracle: dict) -> dict[str, float]:
    """The distances of one run from the oracle's run of the same probe (relative; see the module docstring)."""
    a, o = run["arrays"], oracle["arrays"]

    def rel(x, y):
        return abs(x - y) / abs(y) if y != 0 else abs(x - y)

    n = min(len(a["losses"]), len(o["losses"]))
    return {
        "loss_0": rel(a["losses"][0], o["losses"][0]),
        "weights_1": _scaled(a["weights_1"], o["weights_1"]),
        "loss_n": rel(a["losses"][n - 1], o["losses"][n - 1]) if len(a["losses"]) == len(o["losses"]) else math.inf,
        "weights_n": _scaled(a["weights_n"], o["weights_n"]),
        "pred_n": _scaled(a["pred_n"], o["pred_n"]),
    }


def _run_backend(backend: str, probes: list[Probe], datas: list[dict], timeout: float, work_dir: Path,
                 oracle: bool = False) -> list[dict]:
    missing = backends.missing_requirements(backend)
    if missing:
        reason = f"not installed ({', '.join(missing)}): {backends.install_hint(backend)}"
        return [{"aligned": {"status": "skipped", "reason": reason}, "native": {"status": "skipped", "reason": reason}}
                for _ in probes]
    job_dir = Path(tempfile.mkdtemp(prefix=f"hazards-{backend}-", dir=work_dir))
    job = {"backend": backend, "kind": "hazards", "oracle": oracle,
           "probes": [{"name": p.name, "key": p.key, "dtype": p.dtype, "steps": p.steps, "spec": spec_to_dict(p.spec)}
                      for p in probes]}
    (job_dir / "job.json").write_text(json.dumps(job))
    arrays = {}
    for i, (p, d) in enumerate(zip(probes, datas)):
        for k, v in d.items():
            arrays[f"{i}/{k}"] = v
        for j, w in enumerate(init_weights(p.spec, SEED)):
            arrays[f"{i}/w/{j}"] = w
    np.savez(job_dir / "data.npz", **arrays)
    dtype = "float64" if any(p.dtype == "float64" for p in probes) else "float32"
    proc = subprocess.Popen([sys.executable, "-m", "harness.worker", str(job_dir)], env=subprocess_env(backend, dtype, None),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        out = f"timed out after {timeout:.0f} s\n{out}"
    except BaseException:
        proc.kill()
        proc.wait()
        shutil.rmtree(job_dir, ignore_errors=True)
        raise
    head = {}
    if (job_dir / "worker.json").exists():
        head = json.loads((job_dir / "worker.json").read_text())
    results = []
    for i in range(len(probes)):
        f = job_dir / f"probe-{i}.json"
        if f.exists():
            results.append(json.loads(f.read_text()))
        else:
            status = head.get("status", "error")
            reason = head.get("reason") or f"worker ended (exit {proc.returncode}) before this probe: " + \
                "\n".join(out.strip().splitlines()[-8:])
            results.append({"aligned": {"status": status, "reason": reason}, "native": {"status": status,
                                                                                      "reason": reason}})
    shutil.rmtree(job_dir, ignore_errors=True)
    return results


def run_atlas(backend_names: list[str] | None = None, probe_keys: list[str] | None = None, timeout: float = 1800.0,
              progress: Callable[[str], None] = lambda s: None) -> dict:
    """Run the probes (all, or those whose key or name is in ``probe_keys``) through the oracle and each backend;
    returns the raw record (not yet written)."""
    from .results import git_commit, machine

    names = list(backend_names or DEFAULT_BACKENDS)
    unknown = [b for b in names if b not in backends.all_backends()]
    if unknown:
        raise UserError(f"unknown backend(s) {', '.join(unknown)}; valid: {', '.join(backends.REGISTRY)}")
    probes = list(PROBES)
    if probe_keys:
        probes = [p for p in PROBES if p.key in probe_keys or p.spec.name in probe_keys]
        if not probes:
            raise UserError(f"no probe matches {', '.join(probe_keys)}; keys: {', '.join(sorted({p.key for p in PROBES}))}"
                            f"; names: {', '.join(p.spec.name for p in PROBES)}")
    datas = [probe_data(p.spec) for p in probes]
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="dlcompare-hazards-") as tmp:
        work_dir = Path(tmp)
        progress(f"oracle: {len(probes)} probes, {STEPS} steps each")
        oracle = _run_backend("numpy", probes, datas, timeout, work_dir, oracle=True)
        per_backend = {}
        for b in names:
            t = time.time()
            progress(f"{b}: {len(probes)} probes, aligned and native")
            per_backend[b] = _run_backend(b, probes, datas, timeout, work_dir)
            bad = sum(r.get("native", {}).get("status") == "error" for r in per_backend[b])
            progress(f"{b}: done in {time.time() - t:.0f} s" + (f", {bad} errors" if bad else ""))
    rows = []
    for i, p in enumerate(probes):
        o = oracle[i]["aligned"]
        row = {"name": p.name, "key": p.key, "probe": p.spec.name, "dtype": p.dtype, "steps": p.steps,
               "align": p.align, "spec": spec_to_dict(p.spec), "oracle": {"status": o["status"],
                                                                       "reason": o.get("reason")},
               "backends": {}}
        for b in names:
            res = per_backend[b][i]
            cell = {}
            for mode in ("aligned", "native"):
                r = res.get(mode, {"status": "error", "reason": "no result"})
                c = {"status": r["status"]}
                if r["status"] != "ok":
                    c["reason"] = r.get("reason", "")
                elif o["status"] == "ok":
                    c["effects"] = effects(r, o)
                    c["losses"] = [r["arrays"]["losses"][0], r["arrays"]["losses"][-1]]
                if mode == "native" and r["status"] == "ok":
                    c["setting"] = r["native_settings"].get(p.key)
                    c["native_differences"] = r["native_differences"]
                cell[mode] = c
            row["backends"][b] = cell
        if o["status"] == "ok":
            row["oracle"]["losses"] = [o["arrays"]["losses"][0], o["arrays"]["losses"][-1]]
        rows.append(row)
    return {"schema": 1, "kind": "hazards", "created_utc": _dt.datetime.fromtimestamp(started, _dt.timezone.utc)
            .isoformat(), "duration_s": time.time() - started, "commit": git_commit(), "machine": machine(),
            "versions": {b: backends.version(b) for b in ["numpy", *names]}, "steps": STEPS, "batch": BATCH,
            "samples": SAMPLES, "seed": SEED, "backends": names, "probes": rows}


def write_atlas(record: dict, results_dir: Path) -> tuple[Path, Path]:
    """The raw record under ``results_dir/raw`` (never overwritten) and ``results_dir/hazards.md`` rendered from it."""
    from .results import _exclusive_replace, check_writable, new_run_id

    raw = check_writable(results_dir)
    while True:
        run_id = new_run_id("hazards")
        path = raw / f"{run_id}.json"
        if not path.exists():
            break
    record = {**record, "run_id": run_id}
    tmp = raw / f".{run_id}.json.tmp"
    tmp.write_text(json.dumps(record, indent=1))
    _exclusive_replace(tmp, path)
    md = Path(results_dir) / "hazards.md"
    tmp_md = md.with_suffix(".md.tmp")
    tmp_md.write_text(render(record))
    os.replace(tmp_md, md)
    return path, md


def latest_record(results_dir: Path) -> dict:
    raw = Path(results_dir) / "raw"
    recs = []
    for p in sorted(raw.glob("*-hazards-*.json")):
        rec = json.loads(p.read_text())
        if rec.get("kind") == "hazards":
            recs.append(rec)
    if not recs:
        raise UserError(f"no hazards record under {raw}; run `harness hazards` first")
    return max(recs, key=lambda r: r["created_utc"])


# ------------------------------------------------------------------------------------------------------- report
def _fmt(v: float | None) -> str:
    if v is None:
        return ""
    if not math.isfinite(v):
        return "inf"
    if v == 0:
        return "0"
    return f"{v:.1e}" if v < 0.01 else f"{v:.2g}"


def differing(row: dict) -> list[tuple[str, dict]]:
    """(backend, native cell) for every backend whose own default for this probe's key differs from the spec."""
    return [(b, c["native"]) for b, c in row["backends"].items()
            if c["native"].get("status") == "ok" and c["native"].get("setting")]


def floor(row: dict, backend: str) -> float | None:
    """The aligned run's largest distance from the oracle on this probe: rounding alone."""
    a = row["backends"][backend]["aligned"]
    return max(a["effects"].values()) if "effects" in a else None


def effect(cell: dict) -> float:
    """A native run's effect: the largest of its distances after the last step (weights, predictions, loss)."""
    e = cell["effects"]
    return max(e["weights_n"], e["pred_n"], e["loss_n"])


def above_floor(row: dict, backend: str, cell: dict, factor: float = 10.0) -> bool:
    """The default moves the numbers by more than ``factor`` times what rounding alone does (at least 1e-12)."""
    f = floor(row, backend)
    return "effects" in cell and effect(cell) > max(factor * (f or 0.0), 1e-12)


def size(row: dict) -> float:
    """The probe's largest effect among the backends whose default differs."""
    return max((effect(c) for _, c in differing(row) if "effects" in c), default=0.0)


def render(record: dict) -> str:
    rows = record["probes"]
    measured = [r for r in rows if differing(r)]
    moving = [r for r in measured if any(above_floor(r, b, c) for b, c in differing(r))]
    lines = [
        "# The porting-hazards atlas",
        "",
        f"Generated by `harness hazards` from `results/raw/{record.get('run_id', '?')}.json` (commit "
        f"`{record.get('commit')}`, {record['created_utc'][:16]} UTC); do not edit by hand.",
        "",
        f"Each probe is a minimal network around one framework default (models: `harness/hazards.py`, `PROBES`), "
        f"trained for {record['steps']} steps of batch {record['batch']} on {record['samples']} synthetic samples from "
        f"the same initial weights (seed {record['seed']}).  Every backend runs it twice: **aligned** (the spec) and "
        f"**native with only this default** (`native_only=[key]`).  Numbers are relative distances from the NumPy "
        f"float64 oracle: the loss at the initial weights (`loss@0`), the weights after one update (`w@1`), and "
        f"after the last step the loss, weights and inference predictions (`loss@N`, `w@N`, `pred@N`).  `floor` is "
        f"the aligned run's largest distance: what rounding alone gives.  A framework whose default is the spec's "
        f"shows `= spec`.",
        "",
        f"{len(measured)} of {len(rows)} probes show a default that differs from the spec in at least one framework; "
        f"in {len(moving)} of them it moves the numbers by more than 10 times the aligned floor.",
        "",
        "## Largest measured effects",
        "",
        "Per probe, the framework whose default moves the numbers most (`effect`: the largest of loss, weights and "
        "predictions after the last step; the others are in the per-probe tables below).",
        "",
        "| hazard | framework | its default | loss@0 | w@1 | effect | floor | frameworks that differ | aligns it |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(measured, key=size, reverse=True):
        cells = [(b, c) for b, c in differing(r) if "effects" in c]
        if not cells:
            continue
        b, c = max(cells, key=lambda bc: effect(bc[1]))
        f = floor(r, b)
        lines.append(f"| {r['name']} | {b} | `{c['setting']}` | {_fmt(c['effects']['loss_0'])} | "
                     f"{_fmt(c['effects']['weights_1'])} | {_fmt(effect(c))} | {_fmt(f)} | "
                     f"{', '.join(x for x, _ in differing(r))} | {r['align']} |")
    lines += ["", "## Every probe, every framework", ""]
    for r in rows:
        o = r["oracle"]
        lines += [f"### {r['name']}", "", f"Key `{r['key']}`, probe `{r['probe']}` ({r['dtype']}); aligns it: "
                  f"{r['align']}.", ""]
        if o["status"] != "ok":
            lines += [f"Oracle {o['status']}: {o.get('reason', '')}", ""]
            continue
        lines += ["| framework | default | loss@0 | w@1 | loss@N | w@N | pred@N | floor |",
                  "|---|---|---|---|---|---|---|---|"]
        for b, c in r["backends"].items():
            n, a = c["native"], c["aligned"]
            fl = floor(r, b)
            if n["status"] != "ok":
                lines.append(f"| {b} | {n['status']}: {n.get('reason', '')[:160]} | | | | | | |")
                continue
            e = n.get("effects", {})
            setting = f"`{n['setting']}`" if n.get("setting") else "= spec"
            lines.append(f"| {b} | {setting} | {_fmt(e.get('loss_0'))} | {_fmt(e.get('weights_1'))} | "
                         f"{_fmt(e.get('loss_n'))} | {_fmt(e.get('weights_n'))} | {_fmt(e.get('pred_n'))} | "
                         f"{_fmt(fl) if fl is not None else a['status']} |")
        lines.append("")
    lines += ["## Versions", "", "| backend | version |", "|---|---|"]
    lines += [f"| {b} | {v} |" for b, v in record["versions"].items()]
    m = record.get("machine", {})
    lines += ["", f"Machine: {m.get('cpu', '')}, {m.get('cores', '')} cores, {m.get('platform', '')}.", ""]
    return "\n".join(lines)
