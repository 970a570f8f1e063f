"""The TensorFlow family: ``tf1`` (graph + Session), ``tf2`` (GradientTape under tf.function), ``keras`` on TensorFlow,
JAX and torch.

* Through ``harness.runner.compare`` (one subprocess per backend, the NumPy float64 oracle): float64 rows pass for the
  4-3-1, Pima and MNIST MLP models, float32 rows pass for the CNN (2 steps, batch 8), Keras on torch in
  float64 is a ``skipped`` row that says why, and ``--mode native`` runs and lists what differs from the spec.
* In this process (TensorFlow, and Keras when its backend is TensorFlow): tiny specs that the built-in models do not
  exercise -- sum of squares over several outputs, binary cross-entropy over two units, summed softmax cross-entropy,
  Adam's ``eps_v_hat`` convention, conv + pool + flatten -- against the NumPy oracle at 1e-12 in float64;
  ``gradients`` changes nothing; the ``tf.function`` is traced once and never again.
* Keras ``fit`` and a ``train_on_batch`` loop give bit-identical weights, on every installed Keras backend (JAX and
  torch in a subprocess: a process has one Keras backend).
* Aligned optimizers in this process: every built-in (``tf.compat.v1.train`` ``AdamOptimizer`` /
  ``GradientDescentOptimizer``, ``keras.optimizers.Adam`` / ``SGD`` under tf2, also with XLA, and under the keras
  backend) on the spec's own eps_hat Adam or SGD, and the other convention (eps_v_hat: hand-written in tf1 and tf2,
  ``Unsupported`` in Keras), against the oracle over 12 steps of real data, per step, in float64 (1e-12) and float32;
  ``info["optimizer"]`` names which ran.

Runtime: about 2.5 minutes on 2 cores.
"""

from __future__ import annotations

import dataclasses
import importlib.util

import numpy as np
import pytest

import backends.numpy_scratch as ref
from backends.base import BuildOptions, Unsupported
from harness.runner import CompareConfig, batch_order, compare, load_data
from harness.status import Status
from models import get_model, init_weights
from models.spec import SGD, Adam, Conv2D, Dense, Flatten, Init, Loss, MaxPool2D, ModelSpec, f32
from tests.keras_subprocess import in_keras_backend
from tests.lockstep import optimizer_vs_oracle, with_convention

ALL = ["tf1", "tf2", "keras", "keras-jax", "keras-torch"]


def scaled_error(a, b, floor: float = 1e-300) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = max(np.max(np.abs(a)), np.max(np.abs(b)), floor)
    return float(np.max(np.abs(a - b)) / scale)


def _compare(model: str, backends: list[str], steps: int, dtype: str, **kw) -> list[dict]:
    extra = {"repeat": False} if "repeat" in {f.name for f in dataclasses.fields(CompareConfig)} else {}
    result = compare(CompareConfig(model=model, backends=backends, steps=steps, dtype=dtype, timing=False, **extra,
                                   **kw))
    assert result["rows"], "no rows"
    return result["rows"]


def _why(row: dict) -> str:
    meta = row.get("meta") if isinstance(row.get("meta"), dict) else {}
    return f"{row['backend']} batch {row['batch_size']}: {row['status']}: {row.get('reason')}\n{meta.get('traceback', '')}"


def _assert_pass(rows: list[dict]) -> None:
    for row in rows:
        if row["status"] == Status.SKIPPED and str(row.get("reason", "")).startswith("not installed"):
            continue
        if row["backend"] == "keras-torch" and row["dtype"] == "float64":
            assert row["status"] == Status.SKIPPED, _why(row)
            assert "computes matmuls in float32" in row["reason"] and "result_type(float64, float64)" in row["reason"]
            continue
        assert row["status"] == Status.PASS, _why(row)
        assert row["agreement"]["n_checks"] > 0


# -------------------------------------------------------------------------------------- end to end, through harness
# Each backend costs ~5 s of subprocess start-up per call, so the calls are few.  float64 at 10-12 steps passes the
# step-1 (1e-12) and step-10 (1e-10) checks; the MNIST models run at one batch size (the per-sample invariance check
# runs one gradient per sample of the batch); the CNN in float32, 2 steps, batch 8.
@pytest.mark.parametrize("model,steps,backends,batch_sizes", [
    ("mlp_431", 12, ALL, None),
    ("pima_mlp", 12, ["tf1", "tf2", "keras", "keras-jax"], None),
    ("mnist_mlp", 10, ["tf1", "tf2", "keras", "keras-jax"], [100]),
], ids=["mlp_431", "pima_mlp", "mnist_mlp"])
def test_float64_rows_pass(model, steps, backends, batch_sizes):
    pytest.importorskip("tensorflow")
    rows = _compare(model, backends, steps, "float64", batch_sizes=batch_sizes)
    _assert_pass(rows)  # keras-torch float64: skipped, saying why
    for row in rows:
        info = (row.get("meta") or {}).get("info") or {}
        if row["backend"] == "tf2":
            assert info["traced"] is True and info["trace_s"] > 0 and info["tracing_count"] == 1, info
        if row["backend"] in ("tf1", "tf2", "keras"):
            assert "TF_ENABLE_ONEDNN_OPTS" in info, info


def test_cnn_float32_rows_pass():
    pytest.importorskip("tensorflow")
    _assert_pass(_compare("mnist_cnn", ALL, 2, "float32", batch_sizes=[8]))


def test_native_mode_runs_and_lists_its_differences():
    pytest.importorskip("tensorflow")
    rows = _compare("pima_mlp", ["tf1", "tf2", "keras", "keras-jax"], 3, "float64", mode="native", batch_sizes=[10])
    diffs = {}
    for row in rows:
        if row["status"] == Status.SKIPPED and str(row.get("reason", "")).startswith("not installed"):
            continue
        assert row["status"] in (Status.DIFFERS, Status.MATCHES, Status.PASS, Status.FAIL), _why(row)
        d = ((row.get("meta") or {}).get("info") or {}).get("native_differences")
        assert isinstance(d, list) and d, (row["backend"], d)
        diffs[row["backend"]] = d
        if row["backend"] != "keras":  # Keras on TF uses the logits path and the same Adam: may match
            assert row["status"] in (Status.DIFFERS, Status.FAIL), _why(row)
    assert "Adam epsilon 1e-08 (spec 1e-07)" in diffs["tf1"]
    assert any("beta powers" in d for d in diffs["tf1"])
    assert any(d.startswith("sigmoid output layer") for d in diffs["keras"])
    if "keras-jax" in diffs:
        assert any("clipped" in d for d in diffs["keras-jax"])


# --------------------------------------------------------------------------- tiny specs against the oracle, here
def _spec(name, input_shape, layers, loss, optimizer) -> ModelSpec:
    s = ModelSpec(name=name, description="test", input_shape=input_shape, layers=layers, loss=loss,
                  optimizer=optimizer, init=Init("normal", "normal", 0.5), dataset="none", batch_sizes=(1, 5),
                  epochs=1, expected_params=0, dtype="float64")
    return dataclasses.replace(s, expected_params=s.param_count())


TINY = {
    # the sum of squares over 3 outputs (Keras' MSE would mean over them), mean over the batch, eps_v_hat Adam
    "sse3_eps_v_hat": _spec("sse3", (5,), (Dense(4, "relu"), Dense(3)), Loss("sse", "mean"),
                            Adam(lr=f32(0.01), epsilon=f32(1e-3), convention="eps_v_hat")),
    # conv + pool + flatten, BCE over 2 units (mean over units), summed over the batch
    "cnn_bce2_sum": _spec("cnn_bce2", (6, 6, 2), (Conv2D(3, (3, 3), "relu"), MaxPool2D(2), Flatten(),
                                                  Dense(4, "sigmoid"), Dense(2)),
                          Loss("binary_crossentropy", "sum"), Adam(lr=f32(0.01), epsilon=f32(1e-3))),
    # softmax CE summed over the batch, SGD, sigmoid hidden layer
    "ce_sum_sgd": _spec("ce_sum", (4,), (Dense(6, "sigmoid"), Dense(3)), Loss("softmax_crossentropy", "sum"),
                        SGD(lr=0.05)),
}


def _tiny_data(spec: ModelSpec, steps: int, batch: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    xs = rng.normal(size=(steps, batch) + tuple(spec.input_shape))
    if spec.loss.kind == "softmax_crossentropy":
        ys = rng.integers(0, spec.n_outputs, size=(steps, batch)).astype(np.int64)
    elif spec.loss.kind == "binary_crossentropy":
        ys = rng.integers(0, 2, size=(steps, batch, spec.n_outputs)).astype(np.float64)
    else:
        ys = rng.normal(size=(steps, batch, spec.n_outputs))
    return xs, ys


def _module(name: str, request):
    if name == "keras":
        request.getfixturevalue("keras_tf")
        import backends.keras_api as m
    else:
        pytest.importorskip("tensorflow")
        m = importlib.import_module({"tf1": "backends.tf1_graph", "tf2": "backends.tf2_tape"}[name])
    return m


@pytest.mark.parametrize("tiny", list(TINY))
@pytest.mark.parametrize("backend", ["tf1", "tf2", "keras"])
def test_tiny_specs_match_the_oracle(backend, tiny, request):
    mod = _module(backend, request)
    spec = TINY[tiny]
    w = init_weights(spec, 1)
    xs, ys = _tiny_data(spec, steps=6, batch=5)
    opts = BuildOptions(dtype="float64")
    if backend == "keras" and isinstance(spec.optimizer, Adam) and spec.optimizer.convention != "eps_hat":
        with pytest.raises(Unsupported, match="eps_hat"):
            mod.Model(spec, w, opts)
        return
    m, o = mod.Model(spec, w, opts), ref.Model(spec, w, opts)
    assert scaled_error(m.predict(xs[0]), o.predict(xs[0])) < 1e-12
    lm, gm = m.gradients(xs[0], ys[0])
    lo, go = o.gradients(xs[0], ys[0])
    assert scaled_error(lm, lo) < 1e-12
    assert all(scaled_error(a, b) < 1e-12 for a, b in zip(gm, go))
    for k in range(len(xs)):  # gradients() between the steps must leave weights and optimizer state alone
        m.gradients(xs[k], ys[k])
        assert scaled_error(m.train_step(xs[k], ys[k]), o.train_step(xs[k], ys[k])) < 1e-12
    assert all(scaled_error(a, b) < 1e-12 for a, b in zip(m.get_weights(), o.get_weights()))
    assert scaled_error(m.train_steps(xs, ys), o.train_steps(xs, ys)) < 1e-11
    assert all(scaled_error(a, b) < 1e-11 for a, b in zip(m.get_weights(), o.get_weights()))


def test_tf2_traces_once_and_reports_it():
    pytest.importorskip("tensorflow")
    tf2 = importlib.import_module("backends.tf2_tape")
    spec = TINY["cnn_bce2_sum"]
    m = tf2.Model(spec, init_weights(spec, 0), BuildOptions(dtype="float32"))
    assert m.info["traced"] is True and m.info["trace_s"] > 0 and m.info["jit_compile"] is False
    for batch in (1, 5, 3):  # new batch sizes and float64 input must not retrace
        xs, ys = _tiny_data(spec, steps=2, batch=batch)
        m.train_steps(xs, ys)
        m.predict(xs[0])
    assert m.info["tracing_count"] == 1
    assert m._step.experimental_get_tracing_count() == 1
    fast = tf2.Model(spec, init_weights(spec, 0), BuildOptions(dtype="float32", fast=True))
    assert fast.info["jit_compile"] is True and "XLA" in fast.info["step_function"]
    xs, ys = _tiny_data(spec, steps=3, batch=5)
    assert np.allclose(fast.train_steps(xs, ys), tf2.Model(spec, init_weights(spec, 0),
                                                           BuildOptions(dtype="float32")).train_steps(xs, ys),
                       rtol=1e-5)


# ------------------------------------------------------------------------- aligned optimizers against the oracle
# (backend, model, Adam convention or None for the spec's SGD, what info["optimizer"] starts with, or Unsupported):
# each built-in on the convention it follows exactly (eps_hat), and the other convention
OPTIMIZER_CASES = [
    ("tf1", "pima_mlp", "eps_hat", "built-in tf.compat.v1.train.AdamOptimizer"),
    ("tf1", "mnist_mlp", "eps_hat", "built-in tf.compat.v1.train.AdamOptimizer"),
    ("tf1", "pima_mlp", "eps_v_hat", "hand-written, spec convention (eps_v_hat)"),
    ("tf1", "mlp_431", None, "built-in tf.compat.v1.train.GradientDescentOptimizer"),
    ("tf2", "pima_mlp", "eps_hat", "built-in keras.optimizers.Adam"),
    ("tf2", "mnist_mlp", "eps_hat", "built-in keras.optimizers.Adam"),
    ("tf2", "pima_mlp", "eps_v_hat", "hand-written, spec convention (eps_v_hat)"),
    ("tf2", "mlp_431", None, "built-in keras.optimizers.SGD"),
    ("keras", "pima_mlp", "eps_hat", "built-in keras.optimizers.Adam"),
    ("keras", "mnist_mlp", "eps_hat", "built-in keras.optimizers.Adam"),
    ("keras", "pima_mlp", "eps_v_hat", Unsupported),
    ("keras", "mlp_431", None, "built-in keras.optimizers.SGD"),
]
# measured over the 12 steps (this machine): float64 <= 1.6e-14 (TF1's AdamOptimizer, whose beta powers are products
# accumulated step by step, not pow); float32 (vs the float64 oracle) <= 6.2e-6 (the same)
OPTIMIZER_TOL = {"float64": 1e-12, "float32": 2e-5}


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("backend,model,convention,expected", OPTIMIZER_CASES,
                         ids=[f"{c[0]}-{c[1]}-{c[2] or 'sgd'}" for c in OPTIMIZER_CASES])
def test_aligned_optimizer_matches_oracle(backend, model, convention, expected, dtype, request):
    mod = _module(backend, request)
    spec = with_convention(model, convention)
    if expected is Unsupported:
        with pytest.raises(Unsupported, match="eps_hat convention only"):
            mod.Model(spec, init_weights(spec, 0), BuildOptions(dtype=dtype))
        return
    out = optimizer_vs_oracle(mod, spec, dtype)
    assert out["steps"] == 12
    assert out["optimizer"].startswith(expected), out
    assert out["worst"] < OPTIMIZER_TOL[dtype], out


def test_tf2_keras_adam_under_xla_matches_oracle():
    """The built-in Keras Adam inside the ``tf.function(jit_compile=True)`` step (fast mode)."""
    pytest.importorskip("tensorflow")
    tf2 = importlib.import_module("backends.tf2_tape")
    out = optimizer_vs_oracle(tf2, get_model("pima_mlp"), "float64", fast=True)
    assert out["optimizer"].startswith("built-in keras.optimizers.Adam"), out
    assert out["worst"] < OPTIMIZER_TOL["float64"], out


# ------------------------------------------------------------------------------ Keras fit vs train_on_batch
def fit_vs_train_on_batch(dtype: str, steps: int = 40, batch: int = 10) -> dict:
    """Two Keras models from the same weights: ``train_steps`` (train_on_batch) vs ``fit_epoch`` over the same batches
    of the Pima data.  Runs in whatever Keras backend this process has."""
    import backends.keras_api as ka

    spec = get_model("pima_mlp").with_overrides(dtype=dtype)
    w = init_weights(spec, 0)
    _, x, y, _, _ = load_data(spec, None)
    order = batch_order(len(x), batch, steps, 0, spec.shuffle)
    xs, ys = x[order].astype(dtype), y[order].astype(dtype)
    a = ka.Model(spec, w, BuildOptions(dtype=dtype))
    b = ka.Model(spec, w, BuildOptions(dtype=dtype))
    losses = a.train_steps(xs, ys)
    fit = b.fit_epoch(xs, ys)
    return {"backend": ka.BACKEND,
            "bit_identical": all(np.array_equal(p, q) for p, q in zip(a.get_weights(), b.get_weights())),
            "moved": max(float(np.max(np.abs(p - q))) for p, q in zip(a.get_weights(), w)),
            "first_loss_equal": bool(losses[0] == fit["losses"][0]),
            "loss_rel_err": float(np.max(np.abs(losses - fit["losses"]) / np.abs(losses))),
            "n_logged": len(fit["running_mean"])}


def _check_fit(out: dict, dtype: str, steps: int = 40) -> None:
    assert out["bit_identical"], out
    assert out["moved"] > 1e-4, out  # training really happened
    assert out["n_logged"] == steps and out["first_loss_equal"], out
    # the running-mean reconstruction is close, never exact: it is why train_steps uses train_on_batch
    assert out["loss_rel_err"] < (1e-12 if dtype == "float64" else 1e-4), out


def test_keras_fit_equals_train_on_batch_tensorflow(keras_tf):
    _check_fit(fit_vs_train_on_batch("float64"), "float64")


@pytest.mark.parametrize("backend,dtype", [("jax", "float64"), ("torch", "float32")])
def test_keras_fit_equals_train_on_batch_other_backends(backend, dtype):
    out = in_keras_backend(backend, "test_backend_tf", f"t.fit_vs_train_on_batch({dtype!r})", x64=dtype == "float64",
                           timeout=300)
    assert out["backend"] == backend
    _check_fit(out, dtype)
