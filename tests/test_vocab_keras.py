"""Keras 3 (``backends/keras_api.py``) on the spec vocabulary: BatchNorm, Dropout, Activation, ``use_bias=False``.

* Aligned mode against the NumPy float64 oracle (same weights, same ``BuildOptions(seed=...)``, so the same dropout
  masks): loss, gradients, weights and BatchNorm state after train steps (``train_step``, ``train_steps``, ``fit``),
  and predict, at 1e-12 in float64 -- a conv spec (Conv2D without bias -> BatchNorm -> relu -> pool -> flatten ->
  Dropout -> Dense) at batch 1 and 4, and a dense spec with BatchNorm storing the unbiased variance at batch 4;
  ``gradients`` moves nothing.  On TensorFlow in this process, on JAX (float64) in a subprocess, on torch (float32:
  Keras on torch has no float64) in a subprocess against the oracle in float32.
* An unknown layer type raises ``Unsupported`` naming it.
* Native mode: ``BatchNormalization()``'s moving statistics after one step follow Keras' defaults (momentum 0.99 and
  epsilon 1e-3 as Python doubles, biased variance stored), and they are listed in ``native_differences``;
  ``Dropout(rate)`` keeps values in {0, x/(1-rate)} at a kept fraction near 1-rate, and predict is deterministic.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import numpy as np
import pytest

import backends.numpy_scratch as ref
from backends.base import BuildOptions, Unsupported
from models.spec import (
    SGD,
    Activation,
    Adam,
    BatchNorm,
    Conv2D,
    Dense,
    Dropout,
    Flatten,
    Init,
    Layer,
    Loss,
    MaxPool2D,
    ModelSpec,
    f32,
    init_weights,
)
from tests.keras_subprocess import in_keras_backend  # noqa: E402
from tests.lockstep import scaled_error  # noqa: E402

PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = {"float64": 1e-12, "float32": 2e-4}




def _spec(name, input_shape, layers, loss, optimizer, batch_sizes=(1, 4)) -> ModelSpec:
    s = ModelSpec(name=name, description="test", input_shape=input_shape, layers=layers, loss=loss,
                  optimizer=optimizer, init=Init("normal", "normal", 0.5), dataset="none", batch_sizes=batch_sizes,
                  epochs=1, expected_params=0, dtype="float64")
    return dataclasses.replace(s, expected_params=s.param_count())


SPECS = {
    "conv_bn_dropout": _spec("conv_bn_dropout", (6, 6, 2),
                             (Conv2D(3, (3, 3), use_bias=False), BatchNorm(), Activation("relu"), MaxPool2D(2),
                              Flatten(), Dropout(0.3), Dense(3)),
                             Loss("softmax_crossentropy", "mean"), Adam(lr=f32(0.01))),
    "dense_bn_unbiased": _spec("dense_bn_unbiased", (5,),
                               (Dense(4), BatchNorm(momentum=f32(0.9), epsilon=f32(1e-5),
                                                    unbiased_moving_variance=True),
                                Activation("sigmoid"), Dense(2, use_bias=False)),
                               Loss("sse", "sum"), SGD(lr=0.05), batch_sizes=(2, 4)),
}


def _data(spec: ModelSpec, steps: int, batch: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    xs = rng.normal(size=(steps, batch) + tuple(spec.input_shape)) * 2.0 + 0.5
    if spec.loss.kind == "softmax_crossentropy":
        ys = rng.integers(0, spec.n_outputs, size=(steps, batch)).astype(np.int64)
    else:
        ys = rng.normal(size=(steps, batch, spec.n_outputs))
    return xs, ys


# --------------------------------------------------------------------------- bodies, run in any Keras backend process
def aligned_vs_oracle(spec_name: str, dtype: str, batch: int, steps: int = 4, seed: int = 3) -> dict:
    """The Keras model against the oracle (same dtype) step by step; returns the worst scaled error of each quantity."""
    import backends.keras_api as ka

    spec = SPECS[spec_name]
    w = init_weights(spec, 1)
    xs, ys = _data(spec, 3 * steps, batch)
    opts = BuildOptions(dtype=dtype, seed=seed)
    m, o = ka.Model(spec, w, opts), ref.Model(spec, w, opts)
    err: dict[str, float] = {"loss": 0.0, "grads": 0.0, "weights": 0.0, "state": 0.0, "predict": 0.0,
                             "train_steps": 0.0, "fit": 0.0}
    moved = {"weights": 0.0, "state": 0.0}
    unchanged = True

    def worst(key, a, b):
        err[key] = max(err[key], *(scaled_error(p, q) for p, q in zip(a, b))) if len(a) else err[key]

    err["predict"] = max(err["predict"], scaled_error(m.predict(xs[0]), o.predict(xs[0])))
    for k in range(steps):  # gradients() (twice: it must move nothing), then the update, against the oracle
        w0, s0 = m.get_weights(), m.get_state()
        lm, gm = m.gradients(xs[k], ys[k])
        lm2, gm2 = m.gradients(xs[k], ys[k])
        unchanged &= all(np.array_equal(a, b) for a, b in zip(w0 + s0, m.get_weights() + m.get_state()))
        unchanged &= lm == lm2 and all(np.array_equal(a, b) for a, b in zip(gm, gm2))
        lo, go = o.gradients(xs[k], ys[k])
        err["loss"] = max(err["loss"], scaled_error(lm, lo))
        # against the largest gradient of all: the bias before a BatchNorm has a gradient of exactly zero in
        # mathematics (the batch mean removes it), rounding noise in both, so its own scale is meaningless
        scale = max(float(np.max(np.abs(g))) for g in go)
        err["grads"] = max(err["grads"], *(float(np.max(np.abs(a - b))) / scale for a, b in zip(gm, go)))
        err["loss"] = max(err["loss"], scaled_error(m.train_step(xs[k], ys[k]), o.train_step(xs[k], ys[k])))
        worst("weights", m.get_weights(), o.get_weights())
        worst("state", m.get_state(), o.get_state())
    moved["weights"] = max(float(np.max(np.abs(a - b))) for a, b in zip(m.get_weights(), w))
    moved["state"] = max(float(np.max(np.abs(a - b))) for a, b in zip(m.get_state(), ref.init_state(spec)))
    err["predict"] = max(err["predict"], scaled_error(m.predict(xs[1]), o.predict(xs[1])))
    # train_steps over steps t..t+k-1 (the masks of those steps) on batches staged by to_device (framework tensors,
    # as the timing protocol passes them), then fit over the next batches
    staged = m.to_device(xs[steps:2 * steps], ys[steps:2 * steps])
    err["train_steps"] = scaled_error(m.train_steps(*staged), o.train_steps(xs[steps:2 * steps], ys[steps:2 * steps]))
    worst("train_steps", m.get_weights() + m.get_state(), o.get_weights() + o.get_state())
    m.fit_epoch(xs[2 * steps:], ys[2 * steps:])
    o.train_steps(xs[2 * steps:], ys[2 * steps:])
    worst("fit", m.get_weights() + m.get_state(), o.get_weights() + o.get_state())
    err["predict"] = max(err["predict"], scaled_error(m.predict(xs[2]), o.predict(xs[2])))
    return {"backend": ka.BACKEND, "err": err, "moved": moved, "unchanged": bool(unchanged), "info": m.info}


def native_batchnorm(dtype: str, unbiased: bool) -> dict:
    """One native train step on x -> BatchNormalization() -> Dense(1): the moving statistics against Keras' default
    formula (0.99 and 1 - 0.99 as Python doubles, biased variance) and against the spec's (f32(0.99), the spec's
    variance)."""
    import backends.keras_api as ka

    spec = _spec("native_bn", (3,), (BatchNorm(unbiased_moving_variance=unbiased), Dense(1)), Loss("sse", "sum"),
                 SGD(lr=0.01), batch_sizes=(2, 8))
    rng = np.random.default_rng(5)
    x = rng.normal(size=(8, 3)) * np.array([1.0, 3.0, 0.2]) + np.array([0.5, -2.0, 4.0])
    y = rng.normal(size=(8, 1))
    m = ka.Model(spec, init_weights(spec, 0), BuildOptions(dtype=dtype, mode="native"))
    m.train_step(x.astype(dtype), y.astype(dtype))
    mean, var = m.get_state()
    x = x.astype(dtype).astype(np.float64)
    bmean, bvar = x.mean(0), x.var(0)
    keras_mean, keras_var = 0.99 * 0.0 + bmean * (1.0 - 0.99), 0.99 * 1.0 + bvar * (1.0 - 0.99)
    mom = f32(0.99)
    svar = bvar * 8 / 7 if unbiased else bvar
    spec_mean, spec_var = bmean * (1 - mom), mom + svar * (1 - mom)
    return {"backend": ka.BACKEND, "diffs": m.info["native_differences"],
            "keras_err": max(scaled_error(mean, keras_mean), scaled_error(var, keras_var)),
            "spec_err": max(scaled_error(mean, spec_mean), scaled_error(var, spec_var))}


def native_dropout(dtype: str, rate: float = 0.25, features: int = 400) -> dict:
    """x -> Dropout(rate) -> Dense(1), batch 1, sse: d loss / d kernel = dropped(x) * d loss / d bias, so gradients()
    shows the dropped input; predict must be x @ kernel + bias, every time."""
    import backends.keras_api as ka

    spec = _spec("native_dropout", (features,), (Dropout(rate), Dense(1)), Loss("sse", "sum"), SGD(lr=1e-4))
    rng = np.random.default_rng(7)
    x = rng.uniform(0.5, 1.5, size=(1, features))
    y = np.array([[3.0]])
    w = init_weights(spec, 0)
    m = ka.Model(spec, w, BuildOptions(dtype=dtype, mode="native"))
    p1, p2 = m.predict(x), m.predict(x)
    (_, (gk, gb)), (_, (gk2, _)) = m.gradients(x, y), m.gradients(x, y)
    dropped = gk[:, 0] / gb[0]
    kept = dropped != 0
    scaled = x[0] / (1 - rate)
    m.train_step(x, y)
    _, (gk3, gb3) = m.gradients(x, y)
    return {"backend": ka.BACKEND, "diffs": m.info["native_differences"],
            "kept_fraction": float(kept.mean()),
            "kept_err": scaled_error(dropped[kept], scaled[kept]),
            "zeros_exact": bool(np.all(dropped[~kept] == 0)),
            "predict_deterministic": bool(np.array_equal(p1, p2)),
            "predict_err": scaled_error(p1, x @ w[0] + w[1]),
            "gradients_repeat": bool(np.array_equal(gk, gk2)),
            "next_step_other_mask": bool(not np.array_equal(gk3[:, 0] != 0, kept))}


def _check_aligned(out: dict, dtype: str) -> None:
    tol = TOL[dtype]
    assert out["unchanged"], "gradients() moved weights, state or its own result"
    assert out["moved"]["weights"] > 1e-3 and out["moved"]["state"] > 1e-3, out["moved"]  # training happened
    bad = {k: v for k, v in out["err"].items() if not v < tol}
    assert not bad, (bad, out["info"])


def _check_native_bn(out: dict, dtype: str, unbiased: bool) -> None:
    diffs = out["diffs"]
    if dtype == "float64":
        assert "BatchNorm momentum 0.99 (spec 0.9900000095367432) (a Python double)" in diffs, diffs
        assert any(d.startswith("BatchNorm epsilon 0.001 (spec 0.0010000000474974513)") for d in diffs), diffs
    else:
        assert any(d.startswith("1 - BatchNorm momentum from the Python double 0.99") for d in diffs), diffs
    assert any("biased variance" in d for d in diffs) == unbiased, diffs
    computes32 = out["backend"] != "tensorflow" or dtype == "float32"
    assert any("BatchNorm computes in float32" in d for d in diffs) == (out["backend"] != "tensorflow"
                                                                       and dtype == "float64"), diffs
    assert out["keras_err"] < (2e-6 if computes32 else 1e-14), out
    if unbiased:  # the stored variance is the biased one: far from the spec's
        assert out["spec_err"] > 1e-3, out
    elif not computes32:  # the spec's f32(0.99) instead of 0.99 moves the variance measurably
        assert out["spec_err"] > 1e-12, out


def _check_native_dropout(out: dict, rate: float = 0.25) -> None:
    rng = "torch's global RNG" if out["backend"] == "torch" else "Keras' RNG (seed generator)"
    assert any(d.startswith(f"Dropout masks from {rng}") and d.endswith("trajectories not comparable")
               for d in out["diffs"]), out
    assert abs(out["kept_fraction"] - (1 - rate)) < 0.1, out
    assert out["kept_err"] < 1e-6 and out["zeros_exact"], out
    assert out["predict_deterministic"] and out["predict_err"] < 1e-5, out
    assert out["gradients_repeat"], out  # gradients() leaves the RNG (seed generator, torch's) where it was
    assert out["next_step_other_mask"], out  # the step advanced Keras' RNG


# ----------------------------------------------------------------------------------------- Keras on TensorFlow, here
@pytest.mark.parametrize("spec_name,batch", [("conv_bn_dropout", 1), ("conv_bn_dropout", 4),
                                             ("dense_bn_unbiased", 4)])
def test_aligned_matches_oracle_tensorflow(keras_tf, spec_name, batch):
    out = aligned_vs_oracle(spec_name, "float64", batch)
    _check_aligned(out, "float64")
    expected = "SpecBatchNorm" if "unbiased" in spec_name else "built-in keras.layers.BatchNormalization"
    assert out["info"]["batchnorm"].startswith(expected), out["info"]
    assert out["info"]["dropout"].startswith("MaskDropout") if "dropout" in spec_name else True


def test_aligned_float32_tensorflow(keras_tf):
    _check_aligned(aligned_vs_oracle("conv_bn_dropout", "float32", 4), "float32")


def test_unknown_layer_is_unsupported(keras_tf):
    import backends.keras_api as ka

    @dataclass(frozen=True)
    class Dummy(Layer):
        def output_shape(self, in_shape):
            return tuple(in_shape)

    spec = _spec("dummy", (3,), (Dense(2), Dummy()), Loss("sse", "sum"), SGD(lr=0.1))
    with pytest.raises(Unsupported, match="keras has no Dummy"):
        ka.Model(spec, init_weights(spec, 0), BuildOptions())


def test_tables_cover_the_vocabulary(keras_tf):
    import backends.keras_api as ka
    from models.spec import LAYERS, OPTIMIZERS

    assert set(ka.LAYER_BUILDERS) == set(LAYERS.values())
    assert set(ka.OPTIMIZER_BUILDERS) == set(OPTIMIZERS.values())


@pytest.mark.parametrize("dtype,unbiased", [("float64", False), ("float64", True), ("float32", False)])
def test_native_batchnorm_tensorflow(keras_tf, dtype, unbiased):
    _check_native_bn(native_batchnorm(dtype, unbiased), dtype, unbiased)


def test_native_dropout_tensorflow(keras_tf):
    _check_native_dropout(native_dropout("float64"))


# ------------------------------------------------------------------------------- JAX and torch, in a subprocess each
def _in_keras_backend(backend: str, call: str, x64: bool) -> list[dict]:
    out = in_keras_backend(backend, "test_vocab_keras", f"[{call}]", x64=x64)
    assert all(o["backend"] == backend for o in out)
    return out


def test_keras_jax():
    runs = [("conv_bn_dropout", 1), ("conv_bn_dropout", 4), ("dense_bn_unbiased", 4)]
    call = ", ".join([f"t.aligned_vs_oracle({s!r}, 'float64', {b})" for s, b in runs]
                     + ["t.native_batchnorm('float64', False)", "t.native_batchnorm('float32', True)",
                        "t.native_dropout('float64')"])
    out = _in_keras_backend("jax", call, x64=True)
    for o in out[:3]:
        _check_aligned(o, "float64")
        assert o["info"]["batchnorm"].startswith("SpecBatchNorm"), o["info"]  # the built-in computes in float32
    _check_native_bn(out[3], "float64", False)
    _check_native_bn(out[4], "float32", True)
    _check_native_dropout(out[5])


def test_keras_torch():
    call = ("t.aligned_vs_oracle('conv_bn_dropout', 'float32', 4), t.aligned_vs_oracle('dense_bn_unbiased', "
            "'float32', 4), t.native_batchnorm('float32', False), t.native_dropout('float32')")
    out = _in_keras_backend("torch", call, x64=False)
    _check_aligned(out[0], "float32")
    assert out[0]["info"]["batchnorm"].startswith("built-in"), out[0]["info"]
    _check_aligned(out[1], "float32")
    _check_native_bn(out[2], "float32", False)
    _check_native_dropout(out[3])
