"""Keras 3 (``backends/keras_api.py``) on the spec vocabulary, on its three backends.

* Aligned mode against the NumPy float64 oracle (same weights, same ``BuildOptions(seed=...)``, so the same dropout
  masks), at 1e-12 in float64:
  - ``aligned_vs_oracle`` (loss, gradients, weights and state after ``train_step``, ``train_steps`` on staged tensors,
    ``fit``, predict; ``gradients`` moves nothing): a conv spec with BatchNorm and Dropout at batch 1 and 4, a dense
    spec with BatchNorm storing the unbiased variance, and ``conv_even`` (Conv2D "same" at stride 2 on an even input,
    MaxPool2D strides, LayerNorm, Dense softmax, sparse CCE with class weights, L2, AdamW without lr in its decay);
  - ``steps_vs_oracle`` (gradients, train_step, weights, predict over 5 steps) for the rest of the vocabulary:
    Conv2D "same" at stride 2 on an odd input, AveragePooling2D "same" (asymmetric padding), leaky_relu, gelu in both
    forms, tanh, mse, RMSprop (epsilon inside / outside, initial accumulator), Adagrad (both placements), AdamW (decay
    times lr), SGD momentum in both forms and with Nesterov under a step schedule crossing its boundaries, clipping by
    global norm and per tensor (max_norm small enough to bite), class weights with a sum reduction, and ``info``
    naming the built-in or the hand-written class.
  On TensorFlow in this process; a representative subset on JAX (float64, ``JAX_ENABLE_X64``) and torch (float32:
  Keras on torch has no float64, against the oracle in float32) in a subprocess each.
* Dispatch: an unknown layer type raises ``Unsupported`` naming it; the tables cover the vocabulary.
* Native mode, one key at a time (``extra["native_only"]``): each key Keras has changes what it should -- the first
  update of RMSprop / Adagrad / AdamW equals Keras' default's closed form (and not the spec's), SGD momentum follows
  the velocity form across an lr change, clipping goes per variable, the schedule's lr is float32 on TF,
  LayerNormalization / LeakyReLU / gelu / AveragePooling2D outputs follow Keras' defaults, SparseCategoricalCrossentropy
  on probabilities clips on JAX / torch (16.118) and takes the logits path on TF (30.0), loss_form puts a sigmoid on
  the output -- and ``info["native_settings"]`` names exactly that key; the keys where Keras is the spec
  (class_weight_denominator, l2_regularization, conv_same_padding, clip_epsilon) and the ones it lacks (mse_broadcast,
  lr_precision) never appear, and a native_only run equals the aligned one there.  Adam's epsilon / betas as Python
  doubles, BatchNormalization() and Dropout defaults; on JAX float64, matmul_precision keeps Keras' float32 built-ins.
* Measured facts the module relies on: LeakyReLU() 0.3 vs Activation("leaky_relu") 0.2, Activation("gelu") exact vs
  keras.ops.gelu tanh; tf.nn.gelu's float32-rounded constants in float64; ``ops.cast`` of a Python float on TF.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass

import numpy as np
import pytest

import backends.numpy_scratch as ref
from backends.base import BuildOptions, Unsupported
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
    Dropout,
    Flatten,
    Init,
    Layer,
    LayerNorm,
    Loss,
    MaxPool2D,
    ModelSpec,
    RMSprop,
    StepDecay,
    f32,
    init_weights,
)
from tests.keras_subprocess import in_keras_backend  # noqa: E402
from tests.lockstep import scaled_error  # noqa: E402

PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = {"float64": 1e-12, "float32": 2e-4}


def _spec(name, input_shape, layers, loss, optimizer, batch_sizes=(1, 4), init=None, **kw) -> ModelSpec:
    s = ModelSpec(name=name, description="test", input_shape=input_shape, layers=tuple(layers), loss=loss,
                  optimizer=optimizer, init=init or Init("normal", "normal", 0.5), dataset="none",
                  batch_sizes=batch_sizes, epochs=1, expected_params=0, dtype="float64", **kw)
    return dataclasses.replace(s, expected_params=s.param_count())


def _mlp(name, optimizer, loss=None, **kw) -> ModelSpec:
    return _spec(name, (4,), (Dense(5, "tanh"), Dense(3)), loss or Loss("softmax_crossentropy", "mean"), optimizer,
                 **kw)


DECAY = StepDecay(2, f32(0.5))  # 5 steps: lr, lr, lr/2, lr/2, lr/4
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
    # 6 -> 3 at stride 2 pads (0, 1); MaxPool2D(2, strides=1); LayerNorm over the channels; class weights, L2, AdamW
    # without lr in its decay (hand-written)
    "conv_even": _spec("conv_even", (6, 6, 2),
                       (Conv2D(3, (3, 3), "tanh", "same", strides=(2, 2)), MaxPool2D(2, strides=1),
                        LayerNorm(f32(1e-2)), Flatten(), Dense(3, "softmax")),
                       Loss("sparse_categorical_crossentropy", "mean", (1.0, 2.0, 0.5), l2=f32(1e-2)),
                       AdamW(f32(0.01), weight_decay=f32(0.1), decay_times_lr=False)),
    # 7 -> 4 at stride 2 pads (1, 1); AveragePooling2D 3 stride 2 "same" on 4x4 pads (0, 1); Nesterov accumulator,
    # global clipping that bites
    "conv_odd": _spec("conv_odd", (7, 7, 1),
                      (Conv2D(2, (3, 3), "relu", "same", strides=(2, 2)), AveragePooling2D(3, 2, "same"), Flatten(),
                       Dense(3)),
                      Loss("softmax_crossentropy", "mean"), SGD(0.1, f32(0.9), nesterov=True),
                      clip=ClipNorm(f32(0.5), "global")),
    # the activations, mse, RMSprop with epsilon outside and an initial accumulator (hand-written), the schedule
    "activations": _spec("activations", (4,),
                         (Dense(5, "tanh"), Activation("leaky_relu", f32(0.1)), Dense(4),
                          Activation("gelu", approximate="tanh"), Dense(3), Activation("gelu"), Activation("tanh"),
                          Dense(2)),
                         Loss("mse", "mean"), RMSprop(f32(0.01), epsilon=f32(1e-3), epsilon_inside_sqrt=False,
                                                      initial_accumulator=f32(0.1)), schedule=DECAY),
    "sgd_accumulator": _mlp("sgd_accumulator", SGD(0.1, f32(0.9)), schedule=DECAY),
    "sgd_velocity": _mlp("sgd_velocity", SGD(0.1, f32(0.9), momentum_form="velocity"), schedule=DECAY,
                         loss=Loss("softmax_crossentropy", "sum", (0.5, 1.5, 3.0))),
    "nesterov_accumulator": _mlp("nesterov_accumulator", SGD(0.1, f32(0.9), nesterov=True), schedule=DECAY),
    "nesterov_velocity": _mlp("nesterov_velocity", SGD(0.1, f32(0.9), nesterov=True, momentum_form="velocity"),
                              schedule=DECAY),
    "rmsprop_inside": _mlp("rmsprop_inside", RMSprop(f32(0.01)), clip=ClipNorm(f32(0.3), "per_tensor")),
    "adagrad_inside": _mlp("adagrad_inside", Adagrad(f32(0.1)), clip=ClipNorm(f32(0.3), "global")),
    "adagrad_outside": _mlp("adagrad_outside", Adagrad(f32(0.1), initial_accumulator=0.0, epsilon=f32(1e-3),
                                                       epsilon_inside_sqrt=False)),
    "adamw": _mlp("adamw", AdamW(f32(0.01), weight_decay=f32(0.1)), schedule=DECAY),
}
# what info["optimizer"] starts with, per spec
OPTIMIZER_IMPL = {
    "conv_even": "hand-written AdamWDecayWithoutLR", "conv_odd": "hand-written SGDAccumulator",
    "activations": "hand-written RMSpropSpec", "sgd_accumulator": "hand-written SGDAccumulator",
    "sgd_velocity": "built-in keras.optimizers.SGD", "nesterov_accumulator": "hand-written SGDAccumulator",
    "nesterov_velocity": "built-in keras.optimizers.SGD", "rmsprop_inside": "built-in keras.optimizers.RMSprop",
    "adagrad_inside": "built-in keras.optimizers.Adagrad", "adagrad_outside": "hand-written AdagradSpec",
    "adamw": "built-in keras.optimizers.AdamW",
}


def _data(spec: ModelSpec, steps: int, batch: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    xs = rng.normal(size=(steps, batch) + tuple(spec.input_shape)) * 2.0 + 0.5
    if spec.loss.integer_labels:
        ys = rng.integers(0, spec.n_outputs, size=(steps, batch)).astype(np.int64)
    else:
        ys = rng.normal(size=(steps, batch, spec.n_outputs))
    return xs, ys


def _cast(spec, dtype, x, y):
    return x.astype(dtype), (y if spec.loss.integer_labels else y.astype(dtype))


# --------------------------------------------------------------------------- bodies, run in any Keras backend process
def aligned_vs_oracle(spec_name: str, dtype: str, batch: int, steps: int = 4, seed: int = 3) -> dict:
    """The Keras model against the oracle (same dtype) step by step; returns the worst scaled error of each quantity."""
    import backends.keras_api as ka

    spec = SPECS[spec_name]
    w = init_weights(spec, 1)
    xs, ys = _data(spec, 3 * steps, batch)
    xs, ys = _cast(spec, dtype, xs, ys)
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
    moved["state"] = max([float(np.max(np.abs(a - b))) for a, b in zip(m.get_state(), ref.init_state(spec))],
                         default=1.0)
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


def steps_vs_oracle(spec_name: str, dtype: str, batch: int = 4, steps: int = 5) -> dict:
    """Lighter: ``gradients`` and ``train_step`` against the oracle for ``steps`` steps (gradients scaled per array),
    then predict; the worst scaled error of each, and ``info``."""
    import backends.keras_api as ka

    spec = SPECS[spec_name]
    w = init_weights(spec, 1)
    xs, ys = _cast(spec, dtype, *_data(spec, steps, batch, seed=2))
    m, o = ka.Model(spec, w, BuildOptions(dtype=dtype)), ref.Model(spec, w, BuildOptions(dtype=dtype))
    err = {"loss": 0.0, "grads": 0.0, "weights": 0.0, "predict": 0.0}
    for x, y in zip(xs, ys):
        (lm, gm), (lo, go) = m.gradients(x, y), o.gradients(x, y)
        err["grads"] = max(err["grads"], *(scaled_error(a, b) for a, b in zip(gm, go)))
        err["loss"] = max(err["loss"], scaled_error(lm, lo), scaled_error(m.train_step(x, y), o.train_step(x, y)))
        err["weights"] = max(err["weights"], *(scaled_error(a, b) for a, b in zip(m.get_weights(), o.get_weights())))
    err["predict"] = scaled_error(m.predict(xs[0]), o.predict(xs[0]))
    moved = max(float(np.max(np.abs(a - b))) for a, b in zip(m.get_weights(), w))
    return {"backend": ka.BACKEND, "spec": spec_name, "err": err, "moved": moved, "info": m.info}


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
    return {"backend": ka.BACKEND, "diffs": m.info["native_differences"], "settings": m.info["native_settings"],
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


# ------------------------------------------------------------------------- native keys: closed forms, any backend
W0 = 0.5  # the one weight of the optimizer probes: x = 1 -> Dense(1, no bias) -> sse, so g = 2 * (w - y)


def _one_weight(optimizer, **kw) -> ModelSpec:
    return _spec("one_weight", (1,), (Dense(1, use_bias=False),), Loss("sse", "sum"), optimizer,
                 init=Init(explicit=((W0,),)), **kw)


def _rms(lr, g, rho, eps, inside, v0=0.0):
    v = rho * v0 + (1 - rho) * g * g
    return -lr * g / (math.sqrt(v + eps) if inside else math.sqrt(v) + eps)


def _adagrad(lr, g, a0, eps, inside):
    a = a0 + g * g
    return -lr * g / (math.sqrt(a + eps) if inside else math.sqrt(a) + eps)


LR3, LR2 = f32(1e-3), f32(1e-2)
# key -> (the spec's optimizer, the gradient of the first update, the spec's first update, Keras' default's): the
# golden numbers of the brief come out of the native columns (RMSprop -3.16e-3, Adagrad -3.0e-3)
FIRST_UPDATE = {
    "rmsprop_rho": (RMSprop(LR3, rho=f32(0.99)), 0.1,
                    _rms(LR3, 0.1, f32(0.99), f32(1e-7), True), _rms(LR3, 0.1, 0.9, f32(1e-7), True)),
    "rmsprop_epsilon": (RMSprop(LR3, epsilon=f32(1e-2), epsilon_inside_sqrt=False), 0.1,
                        _rms(LR3, 0.1, f32(0.9), f32(1e-2), False), _rms(LR3, 0.1, f32(0.9), 1e-7, True)),
    "rmsprop_accumulator": (RMSprop(LR3, initial_accumulator=1.0), 0.1,
                            _rms(LR3, 0.1, f32(0.9), f32(1e-7), True, 1.0), _rms(LR3, 0.1, f32(0.9), f32(1e-7), True)),
    # Keras' Constant(0.1) initializer is ops.cast(0.1, dtype): float32-rounded on TF (below)
    "adagrad_accumulator": (Adagrad(LR2, initial_accumulator=0.0), 0.1, _adagrad(LR2, 0.1, 0.0, f32(1e-7), True),
                            {"tensorflow": _adagrad(LR2, 0.1, f32(0.1), f32(1e-7), True),
                             "other": _adagrad(LR2, 0.1, 0.1, f32(1e-7), True)}),
    "adagrad_epsilon": (Adagrad(LR2, epsilon=f32(0.1), epsilon_inside_sqrt=False), 0.1,
                        _adagrad(LR2, 0.1, f32(0.1), f32(0.1), False), _adagrad(LR2, 0.1, f32(0.1), 1e-7, True)),
    # g = 0: the Adam step is 0, the decay alone moves w.  Keras' _apply_weight_decay does ops.cast(0.004, dtype), and
    # on TF a Python float cast passes through float32: f32(0.004) there, 0.004 elsewhere (test_keras_cast_on_tf)
    "adamw_weight_decay": (AdamW(LR3, weight_decay=f32(1e-2)), 0.0, -LR3 * f32(1e-2) * W0,
                           {"tensorflow": -LR3 * f32(0.004) * W0, "other": -LR3 * 0.004 * W0}),
    "adamw_decay_form": (AdamW(LR3, weight_decay=f32(1e-2), decay_times_lr=False), 0.0, -f32(1e-2) * W0,
                         -LR3 * f32(1e-2) * W0),
}


def native_first_update(key: str, mode: str = "native") -> dict:
    """The first update of the one-weight probe with ``native_only=[key]`` (float64; float32 on torch)."""
    import backends.keras_api as ka

    opt, g, _, _ = FIRST_UPDATE[key]
    dtype = "float32" if ka.BACKEND == "torch" else "float64"
    spec = _one_weight(opt)
    m = ka.Model(spec, init_weights(spec, 0), BuildOptions(dtype=dtype, mode=mode, extra={"native_only": [key]}))
    y = np.array([[W0 - g / 2]], dtype)
    m.train_step(np.ones((1, 1), dtype), y)
    return {"backend": ka.BACKEND, "key": key, "delta": float(m.get_weights()[0][0, 0]) - W0,
            "settings": m.info.get("native_settings"), "diffs": m.info.get("native_differences"),
            "optimizer": m.info["optimizer"]}


def native_momentum_form(mode: str = "native") -> dict:
    """SGD(0.1, momentum 0.9) with the lr x0.1 after 2 updates, 4 updates of the one-weight probe; the weights against
    both forms replayed in NumPy on the same gradients (``gradients()`` before each update)."""
    import backends.keras_api as ka

    dtype = "float32" if ka.BACKEND == "torch" else "float64"
    spec = _one_weight(SGD(0.1, f32(0.9)), schedule=StepDecay(2, f32(0.1)))
    m = ka.Model(spec, init_weights(spec, 0), BuildOptions(dtype=dtype, mode=mode,
                                                            extra={"native_only": ["momentum_form"]}))
    x, y = np.ones((1, 1), dtype), np.array([[-1.0]], dtype)
    w_acc = w_vel = W0
    b = v = 0.0
    got = []
    for t in range(4):
        lr = spec.lr_at(t)
        g = float(m.gradients(x, y)[1][0][0, 0])
        m.train_step(x, y)
        got.append(float(m.get_weights()[0][0, 0]))
        g_acc, g_vel = 2 * (w_acc + 1.0), 2 * (w_vel + 1.0)  # each form's own trajectory
        b = f32(0.9) * b + g_acc
        w_acc -= lr * b
        v = f32(0.9) * v - lr * g_vel
        w_vel += v
        assert abs(g - 2 * ((got[-2] if t else W0) + 1.0)) < 1e-5  # the gradient the update used
    return {"backend": ka.BACKEND, "weights": got, "velocity": w_vel, "accumulator": w_acc,
            "settings": m.info.get("native_settings"), "optimizer": m.info["optimizer"]}


def native_clip_scope(mode: str = "native") -> dict:
    """SGD(0.5) on x = 1 -> Dense(1) (kernel and bias, equal gradients g) with ClipNorm(0.05, global): the first update
    per variable (each clipped to 0.05) or global (each scaled by 0.05 / (sqrt(2) |g|))."""
    import backends.keras_api as ka

    dtype = "float32" if ka.BACKEND == "torch" else "float64"
    spec = _spec("clip", (1,), (Dense(1),), Loss("sse", "sum"), SGD(0.5), init=Init(explicit=((W0,), (0.25,))),
                 clip=ClipNorm(f32(0.05), "global"))
    m = ka.Model(spec, init_weights(spec, 0), BuildOptions(dtype=dtype, mode=mode,
                                                            extra={"native_only": ["clip_scope"]}))
    _, (gk, gb) = m.gradients(np.ones((1, 1), dtype), np.zeros((1, 1), dtype))
    m.train_step(np.ones((1, 1), dtype), np.zeros((1, 1), dtype))
    k, b = (float(np.ravel(a)[0]) for a in m.get_weights())
    return {"backend": ka.BACKEND, "g": [float(gk[0, 0]), float(gb[0])], "delta": [k - W0, b - 0.25],
            "settings": m.info.get("native_settings"), "optimizer": m.info["optimizer"]}


def native_lr_schedule(dtype: str = "float64") -> dict:
    """SGD(0.1) with a StepDecay: the first update's learning rate as applied (delta / -g), native and aligned."""
    import backends.keras_api as ka

    spec = _one_weight(SGD(0.1), schedule=StepDecay(1, f32(0.5)))
    out = {"backend": ka.BACKEND}
    for mode in ("aligned", "native"):
        m = ka.Model(spec, init_weights(spec, 0), BuildOptions(dtype=dtype, mode=mode,
                                                                extra={"native_only": ["lr_schedule"]}))
        x, y = np.ones((1, 1), dtype), np.zeros((1, 1), dtype)  # g = 2 * W0 = 1
        g = float(m.gradients(x, y)[1][0][0, 0])
        m.train_step(x, y)
        out[mode] = {"lr": (W0 - float(m.get_weights()[0][0, 0])) / g, "settings": m.info.get("native_settings")}
    return out


def _predict_native_only(spec: ModelSpec, key: str, x, dtype: str = "float64") -> dict:
    import backends.keras_api as ka

    if ka.BACKEND == "torch":
        dtype = "float32"
    w = init_weights(spec, 0)
    out = {"backend": ka.BACKEND, "x": np.asarray(x, np.float64).tolist()}
    for mode in ("aligned", "native"):
        m = ka.Model(spec, w, BuildOptions(dtype=dtype, mode=mode, extra={"native_only": [key]}))
        out[mode] = np.asarray(m.predict(np.asarray(x, dtype)), np.float64).tolist()
        out[f"{mode}_settings"] = m.info.get("native_settings")
        out[f"{mode}_info"] = {k: v for k, v in m.info.items() if k in ("avgpool", "layernorm", "gelu", "tanh")}
    out["oracle"] = np.asarray(ref.Model(spec, w, BuildOptions(dtype=dtype)).predict(np.asarray(x, dtype)),
                               np.float64).tolist()
    return out


LAYER_PROBES = {  # key -> (spec, input)
    "layernorm_epsilon": (_spec("ln", (4,), (LayerNorm(f32(1e-5)),), Loss("mse", "mean"), SGD(0.1)),
                          np.array([[0.01, -0.02, 0.005, 0.0], [1.0, 2.0, -1.0, 0.5]])),
    "leaky_relu_slope": (_spec("leaky", (4,), (Activation("leaky_relu", f32(0.01)),), Loss("mse", "mean"), SGD(0.1)),
                         np.array([[-2.0, -0.5, 0.5, 3.0]])),
    "gelu_approximation": (_spec("gelu", (4,), (Activation("gelu", approximate="tanh"),), Loss("mse", "mean"),
                                 SGD(0.1)), np.array([[-2.7, -1.0, 0.3, 2.7]])),
    "avgpool_count_pad": (_spec("avgpool", (6, 6, 1), (AveragePooling2D(3, 2, "same"), Flatten()),
                                Loss("mse", "mean"), SGD(0.1)),
                          np.random.default_rng(4).normal(size=(2, 6, 6, 1))),
}


def native_layer(key: str) -> dict:
    spec, x = LAYER_PROBES[key]
    return {"key": key, **_predict_native_only(spec, key, x)}


def native_sparse_cce() -> dict:
    """Dense(2, softmax) with logits [30, 0] and the label of the second class: the spec's -log p = 30 + log(1 +
    e^-30); Keras' SparseCategoricalCrossentropy() on the probabilities, with native_only=[sparse_cce_probabilities]."""
    import backends.keras_api as ka

    dtype = "float32" if ka.BACKEND == "torch" else "float64"
    spec = _spec("cce_probs", (2,), (Dense(2, "softmax"),), Loss("sparse_categorical_crossentropy", "mean"), SGD(0.1),
                 init=Init(explicit=((30.0, 0.0, 0.0, 0.0), (0.0, 0.0))))
    x, y = np.array([[1.0, 0.0]], dtype), np.array([1])
    out = {"backend": ka.BACKEND}
    for mode in ("aligned", "native"):
        m = ka.Model(spec, init_weights(spec, 0), BuildOptions(dtype=dtype, mode=mode,
                                                                extra={"native_only": ["sparse_cce_probabilities"]}))
        out[mode] = {"gradients_loss": m.gradients(x, y)[0], "train_loss": m.train_step(x, y),
                     "settings": m.info.get("native_settings"), "diffs": m.info.get("native_differences"),
                     "loss": m.info["loss"]}
    return out


def native_same_as_aligned(key: str) -> dict:
    """A spec where ``key`` would bite elsewhere: Keras' way is the spec's, so native_only=[key] must equal aligned
    (loss and gradients at the initial weights, weights after 2 steps) and name no setting."""
    import backends.keras_api as ka

    dtype = "float32" if ka.BACKEND == "torch" else "float64"
    spec = {
        "class_weight_denominator": _mlp("cw", SGD(0.1), loss=Loss("softmax_crossentropy", "mean", (1.0, 2.0, 0.5))),
        "l2_regularization": _mlp("l2", SGD(0.1), loss=Loss("softmax_crossentropy", "mean", l2=f32(1e-2))),
        "conv_same_padding": SPECS["conv_odd"],
        "clip_epsilon": _mlp("clip_eps", SGD(0.1), clip=ClipNorm(f32(0.1), "global")),
        "mse_broadcast": _spec("mse1", (4,), (Dense(1),), Loss("mse", "mean"), SGD(0.1)),
        "lr_precision": _mlp("lr", SGD(0.1)),
    }[key]
    w = init_weights(spec, 1)
    xs, ys = _cast(spec, dtype, *_data(spec, 2, 4))
    res = {}
    for mode in ("aligned", "native"):
        m = ka.Model(spec, w, BuildOptions(dtype=dtype, mode=mode, extra={"native_only": [key]}))
        loss, grads = m.gradients(xs[0], ys[0])
        losses = [m.train_step(x, y) for x, y in zip(xs, ys)]
        res[mode] = {"loss": loss, "grads": grads, "losses": losses, "weights": m.get_weights(),
                     "settings": m.info.get("native_settings")}
    o = ref.Model(spec, w, BuildOptions(dtype=dtype))
    o_loss = o.gradients(xs[0], ys[0])[0]
    same = all(np.array_equal(a, b) for a, b in zip(res["aligned"]["weights"] + res["aligned"]["grads"],
                                                    res["native"]["weights"] + res["native"]["grads"]))
    return {"backend": ka.BACKEND, "key": key, "same": bool(same and res["aligned"]["losses"] ==
                                                           res["native"]["losses"]),
            "loss_vs_oracle": scaled_error(res["native"]["loss"], o_loss), "settings": res["native"]["settings"]}


def native_loss_form() -> dict:
    """BCE from logits, native_only=[loss_form]: a sigmoid output layer, the loss on its probabilities."""
    import backends.keras_api as ka

    dtype = "float32" if ka.BACKEND == "torch" else "float64"
    spec = _spec("bce", (3,), (Dense(1),), Loss("binary_crossentropy", "mean"), SGD(0.1))
    x = np.array([[1.0, -2.0, 0.5], [0.3, 0.1, -1.0]], dtype)
    w = init_weights(spec, 0)
    m = ka.Model(spec, w, BuildOptions(dtype=dtype, mode="native", extra={"native_only": ["loss_form"]}))
    return {"backend": ka.BACKEND, "predict": m.predict(x).tolist(),
            "sigmoid": (1 / (1 + np.exp(-(x.astype(np.float64) @ w[0] + w[1])))).tolist(),
            "settings": m.info["native_settings"], "diffs": m.info["native_differences"]}


def native_precision(spec_name: str = "precision") -> dict:
    """BatchNorm and tanh, float64: native_only=[matmul_precision] keeps Keras' built-ins (float32 on JAX)."""
    import backends.keras_api as ka

    spec = _spec("precision", (4,), (Dense(5, "tanh"), BatchNorm(), LayerNorm(), Dense(3)),
                 Loss("softmax_crossentropy", "mean"), SGD(0.1), batch_sizes=(2, 4))
    w = init_weights(spec, 1)
    xs, ys = _data(spec, 1, 4)
    out = {"backend": ka.BACKEND}
    for mode in ("aligned", "native"):
        m = ka.Model(spec, w, BuildOptions(dtype="float64", mode=mode, extra={"native_only": ["matmul_precision"]}))
        m.train_step(xs[0], ys[0])
        out[mode] = {"predict": m.predict(xs[0]).tolist(), "settings": m.info.get("native_settings"),
                     "diffs": m.info.get("native_differences"), "batchnorm": m.info["batchnorm"],
                     "layernorm": m.info["layernorm"]}
    o = ref.Model(spec, w, BuildOptions(dtype="float64"))
    o.train_step(xs[0], ys[0])
    out["oracle"] = o.predict(xs[0]).tolist()
    return out


# ------------------------------------------------------------------------------------------------------ the checks
def _check_aligned(out: dict, dtype: str) -> None:
    tol = TOL[dtype]
    assert out["unchanged"], "gradients() moved weights, state or its own result"
    assert out["moved"]["weights"] > 1e-3 and out["moved"]["state"] > 1e-3, out["moved"]  # training happened
    bad = {k: v for k, v in out["err"].items() if not v < tol}
    assert not bad, (bad, out["info"])


def _check_steps(out: dict, dtype: str) -> None:
    bad = {k: v for k, v in out["err"].items() if not v < TOL[dtype]}
    assert not bad and out["moved"] > 1e-3, (out["spec"], bad, out["moved"], out["info"])
    assert out["info"]["optimizer"].startswith(OPTIMIZER_IMPL[out["spec"]]), out["info"]


def _check_native_bn(out: dict, dtype: str, unbiased: bool) -> None:
    diffs = out["diffs"]
    if dtype == "float64":
        assert "BatchNorm momentum 0.99 (spec 0.9900000095367432) (a Python double)" in diffs, diffs
        assert any(d.startswith("BatchNorm epsilon 0.001 (spec 0.0010000000474974513)") for d in diffs), diffs
    else:
        assert any(d.startswith("1 - BatchNorm momentum from the Python double 0.99") for d in diffs), diffs
    assert any("biased variance" in d for d in diffs) == unbiased, diffs
    assert ("batchnorm_variance" in out["settings"]) == unbiased, out["settings"]
    assert {"batchnorm_momentum"} <= set(out["settings"]), out["settings"]
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


def _check_first_update(out: dict) -> None:
    key = out["key"]
    _, _, spec_delta, keras_delta = FIRST_UPDATE[key]
    if isinstance(keras_delta, dict):
        keras_delta = keras_delta.get(out["backend"], keras_delta["other"])
    # delta = w1 - W0 carries W0's rounding (an ulp of 0.5: 1e-16 in float64, 6e-8 in float32) on top of its own
    tol = 1e-5 * abs(keras_delta) + (2e-7 if out["backend"] == "torch" else 1e-12 * abs(keras_delta) + 1e-15)
    assert abs(out["delta"] - keras_delta) <= tol, (out, keras_delta)
    assert abs(out["delta"] - spec_delta) > 1e-3 * abs(spec_delta) + 100 * tol, (out, spec_delta)
    assert list(out["settings"]) == [key], out["settings"]


def _check_momentum_form(out: dict) -> None:
    tol = 1e-5 if out["backend"] == "torch" else 1e-12
    assert abs(out["weights"][-1] - out["velocity"]) < tol, out
    assert abs(out["velocity"] - out["accumulator"]) > 0.1, out  # the two forms part after the lr change
    assert list(out["settings"]) == ["momentum_form"], out["settings"]
    assert out["optimizer"].startswith("built-in keras.optimizers.SGD"), out


def _check_clip_scope(out: dict) -> None:
    (gk, gb), (dk, db) = out["g"], out["delta"]
    assert abs(gk) > 0.1 and abs(gk - gb) < 1e-6  # both far above the max norm
    tol = 1e-6 if out["backend"] == "torch" else 1e-14
    clipped = 0.5 * f32(0.05)  # per variable: each gradient clipped to norm 0.05 alone
    assert abs(dk + clipped * np.sign(gk)) < tol and abs(db + clipped * np.sign(gb)) < tol, out
    assert list(out["settings"]) == ["clip_scope"] and "clipnorm=0.05" in out["optimizer"], out


def _check_layer(out: dict) -> None:
    key, x = out["key"], np.array(out["x"])
    nat, ali, oracle = np.array(out["native"]), np.array(out["aligned"]), np.array(out["oracle"])
    tol = 1e-5 if out["backend"] == "torch" else 1e-13
    assert scaled_error(ali, oracle) < tol, out
    if key == "layernorm_epsilon":
        mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        assert scaled_error(nat, (x - mean) / np.sqrt(var + 1e-3)) < tol, out
        assert scaled_error(nat, oracle) > 0.1  # first row: variance 1e-4, against epsilon 1e-3 vs 1e-5
    elif key == "leaky_relu_slope":
        slope = f32(0.3) if out["backend"] == "tensorflow" else 0.3  # tf.nn.leaky_relu's alpha is a float32 attr
        assert scaled_error(nat, np.where(x > 0, x, slope * x)) < tol, out
    elif key == "gelu_approximation":
        exact = 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))
        assert scaled_error(nat, exact) < tol and scaled_error(oracle, exact) > 1e-4, out
    if key == "avgpool_count_pad" and out["backend"] != "torch":  # TF and JAX: Keras' "same" is the spec's
        assert out["native_settings"] == {} and scaled_error(nat, oracle) < tol, out
        return
    assert list(out["native_settings"]) == [key], out["native_settings"]
    assert out["aligned_settings"] is None, out  # aligned mode has no native bookkeeping
    if key == "avgpool_count_pad":  # torch: the asymmetric "same" padding (6 -> 3, pads (0, 1)) replicates edges
        assert "SpecAveragePooling2D" in out["aligned_info"]["avgpool"], out
        assert scaled_error(nat, oracle) > 1e-2, out


def _check_sparse_cce(out: dict) -> None:
    spec_loss = 30.0 + math.log1p(math.exp(-30.0))
    tol = 1e-6 if out["backend"] == "torch" else 1e-12
    ali, nat = out["aligned"], out["native"]
    assert abs(ali["gradients_loss"] - spec_loss) < 1e-3 and abs(ali["train_loss"] - spec_loss) < 1e-3, out
    if out["backend"] != "torch":
        assert abs(ali["gradients_loss"] - spec_loss) < tol * spec_loss, out
    # Keras on TF recovers the logits from the Softmax op (no clipping); JAX / torch clip p to 1e-7
    want = spec_loss if out["backend"] == "tensorflow" else -math.log(1e-7)
    for loss in (nat["gradients_loss"], nat["train_loss"]):
        assert abs(loss - want) < 1e-5 * want, (out, want)
    assert list(nat["settings"]) == ["sparse_cce_probabilities"], nat
    assert ("logits path" in nat["diffs"][0]) == (out["backend"] == "tensorflow"), nat


def _check_same_as_aligned(out: dict) -> None:
    assert out["same"], out
    assert out["settings"] == {}, out
    assert out["loss_vs_oracle"] < (1e-6 if out["backend"] == "torch" else 1e-12), out


# ----------------------------------------------------------------------------------------- Keras on TensorFlow, here
@pytest.mark.parametrize("spec_name,batch", [("conv_bn_dropout", 1), ("conv_bn_dropout", 4),
                                             ("dense_bn_unbiased", 4), ("conv_even", 4)])
def test_aligned_matches_oracle_tensorflow(keras_tf, spec_name, batch):
    out = aligned_vs_oracle(spec_name, "float64", batch)
    _check_aligned(out, "float64")
    if "bn" in spec_name:
        expected = "SpecBatchNorm" if "unbiased" in spec_name else "built-in keras.layers.BatchNormalization"
        assert out["info"]["batchnorm"].startswith(expected), out["info"]
    assert out["info"]["dropout"].startswith("MaskDropout") if "dropout" in spec_name else True


VOCAB = [n for n in OPTIMIZER_IMPL if n != "conv_even"]


@pytest.mark.parametrize("spec_name", VOCAB)
def test_vocabulary_matches_oracle_tensorflow(keras_tf, spec_name):
    out = steps_vs_oracle(spec_name, "float64")
    _check_steps(out, "float64")
    if spec_name == "activations":  # tf.nn.gelu's float32 constants: the written-out gelu runs in float64
        assert out["info"]["gelu"].startswith("gelu_in_dtype"), out["info"]


def test_aligned_float32_tensorflow(keras_tf):
    _check_aligned(aligned_vs_oracle("conv_bn_dropout", "float32", 4), "float32")
    _check_steps(steps_vs_oracle("activations", "float32"), "float32")


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


def test_tf_gelu_constants_are_float32_in_float64(keras_tf):
    """Why aligned float64 on TF writes gelu out: tf.nn.gelu casts its constants through float32."""
    import tensorflow as tf

    from backends.keras_api import gelu_in_dtype

    x = np.linspace(-3, 3, 61)
    exact = 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))
    t = tf.constant(x, tf.float64)
    assert scaled_error(tf.nn.gelu(t, approximate=False).numpy(), exact) > 1e-10
    assert scaled_error(gelu_in_dtype(t).numpy(), exact) < 1e-15


def test_keras_cast_on_tf_rounds_python_floats_through_float32(keras_tf):
    """Why Keras' Adagrad starts at f32(0.1) and AdamW decays by f32(0.004) in a float64 run on TF."""
    from backends.keras_api import keras_cast

    assert keras_cast(0.1, "float64") == f32(0.1) != 0.1 and keras_cast(0.004, "float64") == f32(0.004)


def test_eps_v_hat_is_unsupported_unless_native_adam_convention(keras_tf):
    import backends.keras_api as ka

    spec = _mlp("eps_v_hat", Adam(f32(1e-3), convention="eps_v_hat"))
    with pytest.raises(Unsupported, match="eps_hat convention only"):
        ka.Model(spec, init_weights(spec, 0), BuildOptions())
    m = ka.Model(spec, init_weights(spec, 0), BuildOptions(mode="native", extra={"native_only": ["adam_convention"]}))
    assert list(m.info["native_settings"]) == ["adam_convention"], m.info
    assert m.info["native_differences"] == ["Adam epsilon convention eps_hat (spec eps_v_hat)"]


@pytest.mark.parametrize("dtype,unbiased", [("float64", False), ("float64", True), ("float32", False)])
def test_native_batchnorm_tensorflow(keras_tf, dtype, unbiased):
    _check_native_bn(native_batchnorm(dtype, unbiased), dtype, unbiased)


def test_native_dropout_tensorflow(keras_tf):
    _check_native_dropout(native_dropout("float64"))


@pytest.mark.parametrize("key", list(FIRST_UPDATE))
def test_native_first_update_is_keras_default_closed_form_tensorflow(keras_tf, key):
    _check_first_update(native_first_update(key))


def test_native_golden_first_updates(keras_tf):
    """The brief's golden numbers, from Keras' own defaults (every key native)."""
    for key, golden in (("rmsprop_rho", -3.16e-3), ("adagrad_accumulator", -3.0e-3)):
        out = native_first_update(key)
        assert abs(out["delta"] - golden) < 0.01 * abs(golden), out


def test_native_momentum_form_tensorflow(keras_tf):
    _check_momentum_form(native_momentum_form())


def test_native_clip_scope_tensorflow(keras_tf):
    _check_clip_scope(native_clip_scope())


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_native_adam_keys_tensorflow(keras_tf, dtype):
    """Adam's defaults one at a time: epsilon 1e-7 and the betas as Python doubles (in float32 the betas round to the
    spec's, but 1 - beta is rounded from the double)."""
    import backends.keras_api as ka

    spec = _mlp("adam", Adam(f32(1e-3)))
    settings, diffs = {}, {}
    for key in ("adam_epsilon", "adam_one_minus_beta", "adam_convention"):
        m = ka.Model(spec, init_weights(spec, 0), BuildOptions(dtype=dtype, mode="native", extra={"native_only": [key]}))
        settings[key], diffs[key] = m.info["native_settings"], m.info["native_differences"]
        assert m.info["optimizer"].startswith("built-in keras.optimizers.Adam"), m.info
    assert settings["adam_convention"] == {}  # the spec's eps_hat is Keras' form
    assert list(settings["adam_one_minus_beta"]) == ["adam_one_minus_beta"], settings
    if dtype == "float32":
        assert settings["adam_epsilon"] == {}, settings  # 1e-7 and f32(1e-7) are the same float32
        assert any(d.startswith("1 - Adam beta_1 from the Python double 0.9") for d in diffs["adam_one_minus_beta"])
    else:
        assert diffs["adam_epsilon"] == ["Adam epsilon 1e-07 (spec 1.0000000116860974e-07)"], diffs
        assert "Adam beta_1 0.9 (spec 0.8999999761581421) (a Python double)" in diffs["adam_one_minus_beta"], diffs


def test_keras_activation_defaults(keras_tf):
    """What a Keras user gets: LeakyReLU() 0.3, Activation("leaky_relu") 0.2, Activation("gelu") exact, ops.gelu tanh."""
    import keras

    x = keras.ops.convert_to_tensor(np.array([-1.0, 1.0], "float32"))
    assert float(keras.layers.LeakyReLU()(x)[0]) == f32(-0.3)
    assert float(keras.layers.Activation("leaky_relu")(x)[0]) == f32(-0.2)
    exact, tanh = 0.5 * (1 + math.erf(1 / math.sqrt(2))), 0.5 * (1 + math.tanh(math.sqrt(2 / math.pi) * 1.044715))
    assert abs(float(keras.layers.Activation("gelu")(x)[1]) - exact) < 1e-7
    assert abs(float(keras.ops.gelu(x)[1]) - tanh) < 1e-7 and abs(exact - tanh) > 1e-4


def test_native_lr_schedule_is_float32_on_tensorflow(keras_tf):
    out = native_lr_schedule()
    assert abs(out["aligned"]["lr"] - 0.1) < 1e-15 and out["aligned"]["settings"] is None, out
    assert abs(out["native"]["lr"] - float(np.float32(0.1))) < 1e-15, out  # ExponentialDecay's float32 tensor
    assert list(out["native"]["settings"]) == ["lr_schedule"], out


@pytest.mark.parametrize("key", list(LAYER_PROBES))
def test_native_layer_defaults_tensorflow(keras_tf, key):
    _check_layer(native_layer(key))


def test_native_sparse_cce_on_probabilities_tensorflow(keras_tf):
    _check_sparse_cce(native_sparse_cce())


@pytest.mark.parametrize("key", ["class_weight_denominator", "l2_regularization", "conv_same_padding", "clip_epsilon",
                                 "mse_broadcast", "lr_precision"])
def test_native_keys_where_keras_is_the_spec_tensorflow(keras_tf, key):
    _check_same_as_aligned(native_same_as_aligned(key))


def test_native_loss_form_tensorflow(keras_tf):
    out = native_loss_form()
    assert scaled_error(out["predict"], out["sigmoid"]) < 1e-14, out
    assert list(out["settings"]) == ["loss_form"], out
    assert any(d.startswith("sigmoid output layer") for d in out["diffs"]), out


def test_native_settings_name_every_changed_key_and_only_those(keras_tf):
    """Full native mode on a spec touching many keys: one setting per key that differs; native_only restricts."""
    import backends.keras_api as ka

    spec = _spec("many", (6, 6, 2), (Conv2D(3, (3, 3), "tanh", "same", strides=(2, 2)), LayerNorm(f32(1e-5)),
                                     Activation("leaky_relu", f32(0.01)), Flatten(), Dense(4),
                                     Activation("gelu", approximate="tanh"), Dense(3)),
                 Loss("softmax_crossentropy", "sum", (1.0, 2.0, 0.5), l2=f32(1e-3)),
                 RMSprop(LR3, rho=f32(0.99), epsilon=f32(1e-8), epsilon_inside_sqrt=False),
                 clip=ClipNorm(f32(1.0), "global"), schedule=StepDecay(10, f32(0.5)))
    m = ka.Model(spec, init_weights(spec, 0), BuildOptions(mode="native"))
    assert set(m.info["native_settings"]) == {"layernorm_epsilon", "leaky_relu_slope", "gelu_approximation",
                                              "loss_form", "rmsprop_rho", "rmsprop_epsilon", "clip_scope",
                                              "lr_schedule", "matmul_precision"}, m.info["native_settings"]
    assert "gelu computes with float32-rounded constants" in " ".join(m.info["native_differences"])
    assert m.info["optimizer"].startswith("built-in keras.optimizers.RMSprop"), m.info
    for key in m.info["native_settings"]:
        one = ka.Model(spec, init_weights(spec, 0), BuildOptions(mode="native", extra={"native_only": [key]}))
        assert list(one.info["native_settings"]) == [key], (key, one.info["native_settings"])
    with pytest.raises(ValueError, match="unknown native_only"):
        ka.Model(spec, init_weights(spec, 0), BuildOptions(mode="native", extra={"native_only": ["nope"]}))


# ------------------------------------------------------------------------------- JAX and torch, in a subprocess each
def _in_keras_backend(backend: str, call: str, x64: bool) -> list[dict]:
    out = in_keras_backend(backend, "test_vocab_keras", f"[{call}]", x64=x64)
    assert all(o["backend"] == backend for o in out)
    return out


SUBSET = ["conv_odd", "activations", "sgd_accumulator", "adagrad_outside", "adamw"]


def test_keras_jax():
    runs = [("conv_bn_dropout", 1), ("dense_bn_unbiased", 4)]
    calls = ([f"t.aligned_vs_oracle({s!r}, 'float64', {b})" for s, b in runs]
             + [f"t.steps_vs_oracle({s!r}, 'float64')" for s in ["conv_even", *SUBSET]]
             + ["t.native_batchnorm('float64', False)", "t.native_batchnorm('float32', True)",
                "t.native_dropout('float64')", "t.native_layer('avgpool_count_pad')", "t.native_sparse_cce()",
                "t.native_lr_schedule()", "t.native_precision()", "t.native_first_update('rmsprop_epsilon')",
                "t.native_same_as_aligned('class_weight_denominator')"])
    out = _in_keras_backend("jax", ", ".join(calls), x64=True)
    for o in out[:2]:
        _check_aligned(o, "float64")
    assert out[0]["info"]["batchnorm"].startswith("SpecBatchNorm"), out[0]["info"]  # the built-in computes in float32
    for o in out[2:8]:
        _check_steps(o, "float64")
    assert out[2]["info"]["layernorm"].startswith("SpecLayerNorm"), out[2]["info"]
    assert out[4]["info"]["tanh"].startswith("tanh_in_dtype"), out[4]["info"]  # keras.ops.tanh computes in float32
    _check_native_bn(out[8], "float64", False)
    _check_native_bn(out[9], "float32", True)
    _check_native_dropout(out[10])
    _check_layer(out[11])
    _check_sparse_cce(out[12])
    sched = out[13]  # JAX keeps the Python float lr in float64: nothing to note
    assert abs(sched["native"]["lr"] - 0.1) < 1e-15 and sched["native"]["settings"] == {}, sched
    prec = out[14]
    assert scaled_error(prec["aligned"]["predict"], prec["oracle"]) < 1e-12, prec
    assert 1e-12 < scaled_error(prec["native"]["predict"], prec["oracle"]) < 1e-5, prec
    assert list(prec["native"]["settings"]) == ["matmul_precision"], prec
    assert prec["native"]["batchnorm"].startswith("built-in") and prec["aligned"]["batchnorm"].startswith("Spec")
    assert any(d.startswith("tanh computes in float32") for d in prec["native"]["diffs"]), prec
    _check_first_update(out[15])
    _check_same_as_aligned(out[16])


def test_keras_torch():
    calls = (["t.aligned_vs_oracle('conv_bn_dropout', 'float32', 4)", "t.aligned_vs_oracle('dense_bn_unbiased', "
              "'float32', 4)", "t.aligned_vs_oracle('conv_even', 'float32', 4)"]
             + [f"t.steps_vs_oracle({s!r}, 'float32')" for s in SUBSET]
             + ["t.native_batchnorm('float32', False)", "t.native_dropout('float32')",
                "t.native_layer('avgpool_count_pad')", "t.native_sparse_cce()", "t.native_momentum_form()",
                "t.native_clip_scope()", "t.native_first_update('adamw_decay_form')"])
    out = _in_keras_backend("torch", ", ".join(calls), x64=False)
    for o in out[:3]:
        _check_aligned(o, "float32")
    assert out[0]["info"]["batchnorm"].startswith("built-in"), out[0]["info"]
    for o in out[3:8]:
        _check_steps(o, "float32")
    assert out[3]["info"]["avgpool"].startswith("SpecAveragePooling2D"), out[3]["info"]  # torch replicates edges
    _check_native_bn(out[8], "float32", False)
    _check_native_dropout(out[9])
    _check_layer(out[10])
    _check_sparse_cce(out[11])
    _check_momentum_form(out[12])
    _check_clip_scope(out[13])
    _check_first_update(out[14])
