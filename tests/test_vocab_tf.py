"""tf1 (graph + Session) and tf2 (GradientTape under tf.function) on the whole spec vocabulary: Conv2D without bias,
BatchNorm, Activation, Dropout, Dense without bias, against the NumPy float64 oracle, in this process.

* Aligned, float64: loss, every gradient, weights and BatchNorm state after each of a few steps, and predictions
  (inference mode, moving statistics) agree with the oracle to 1e-12 (same weights, same seed: the same dropout
  masks), at batch sizes 1 (conv spec) and 4; ``gradients`` moves neither weights, optimizer nor state; tf2 traces
  its step once for every batch size.
* A layer or optimizer missing from a backend's table is ``Unsupported("<backend> has no <Type>")``.
* Native mode: the BatchNorm state after one step follows the formula measured for each framework default (TF1's
  fused path stores the Bessel-corrected variance, its plain path the biased one with a float32 ``1 - 0.99``; TF2
  follows Keras' BatchNormalization defaults), and native dropout keeps values in {0, x/(1-p)}, about 1-p of them,
  while predict is deterministic.  (One default at a time: tests/test_hazards_tf.py.)
* The hazards vocabulary, aligned, float64, 1e-12 against the oracle: Conv2D 'same' at stride 2 on an odd and an even
  input, AveragePooling2D 'same' (in-image counts), overlapping MaxPool2D, LayerNorm, tanh / softmax / leaky_relu /
  both gelu forms, mse, sparse CCE on a softmax (a Dense activation and an Activation layer), class weights (one of
  them 0), L2; every optimizer form (SGD accumulator / velocity, each with Nesterov; Adam; RMSprop and Adagrad with
  epsilon inside and outside the square root and their initial accumulators; AdamW with and without the learning rate
  in the decay, both Adam conventions) under a step schedule crossing two boundaries, five of them with clipping that
  bites (both scopes), and which ran: the built-in or the hand-written update.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass

import numpy as np
import pytest

pytest.importorskip("tensorflow")

import backends.numpy_scratch as ref  # noqa: E402
from backends.base import BuildOptions, Unsupported  # noqa: E402
from models.spec import (  # noqa: E402
    LAYERS,
    OPTIMIZERS,
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
from tests.lockstep import scaled_error  # noqa: E402

BACKENDS = {"tf1": "backends.tf1_graph", "tf2": "backends.tf2_tape"}


def _mod(name):
    return importlib.import_module(BACKENDS[name])


def _spec(name, input_shape, layers, loss, optimizer, batch_sizes=(1, 4)) -> ModelSpec:
    s = ModelSpec(name=name, description="test", input_shape=input_shape, layers=tuple(layers), loss=loss,
                  optimizer=optimizer, init=Init("normal", "normal", 0.5), dataset="none", batch_sizes=batch_sizes,
                  epochs=1, expected_params=0, dtype="float64")
    return dataclasses.replace(s, expected_params=s.param_count())


CONV = _spec("conv_bn", (6, 6, 2), [Conv2D(3, (3, 3), use_bias=False), BatchNorm(), Activation("relu"), MaxPool2D(2),
                                    Flatten(), Dropout(0.4), Dense(3)],
             Loss("softmax_crossentropy", "mean"), Adam(lr=f32(0.01), epsilon=f32(1e-3)))
DENSE = _spec("dense_bn", (5,), [Dense(4, use_bias=False), BatchNorm(momentum=f32(0.9), unbiased_moving_variance=True),
                                 Activation("sigmoid"), Dense(2)],
              Loss("sse", "mean"), SGD(lr=0.05), batch_sizes=(2, 4))
SPECS = {"conv": CONV, "dense": DENSE}




def _data(spec, steps, batch, seed=0):
    rng = np.random.default_rng(seed)
    xs = rng.normal(size=(steps, batch, *spec.input_shape)) + 0.3
    if spec.loss.integer_labels:
        ys = rng.integers(0, spec.n_outputs, size=(steps, batch)).astype(np.int64)
    else:
        ys = rng.normal(size=(steps, batch, spec.n_outputs))
    return xs, ys


def _close(a_list, b_list, tol, what):
    assert len(a_list) == len(b_list), what
    for k, (a, b) in enumerate(zip(a_list, b_list)):
        assert np.shape(a) == np.shape(b), (what, k, np.shape(a), np.shape(b))
        assert scaled_error(a, b) <= tol, (what, k, scaled_error(a, b))


CASES = [("conv", 1), ("conv", 4), ("dense", 4)]  # a dense BatchNorm at batch 1 has zero variance


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("spec_name,batch", CASES, ids=[f"{s}-b{b}" for s, b in CASES])
def test_aligned_float64_matches_the_oracle(backend, spec_name, batch):
    spec = SPECS[spec_name]
    w = init_weights(spec, 3)
    opts = BuildOptions(dtype="float64", seed=7)
    m, o = _mod(backend).Model(spec, w, opts), ref.Model(spec, w, opts)
    xs, ys = _data(spec, steps=6, batch=batch)
    tol = 1e-12
    assert scaled_error(m.predict(xs[0]), o.predict(xs[0])) < tol
    _close(m.get_state(), o.get_state(), 0, "initial state")
    for k in range(4):
        w0, s0 = m.get_weights(), m.get_state()
        lm, gm = m.gradients(xs[k], ys[k])
        lo, go = o.gradients(xs[k], ys[k])
        assert scaled_error(lm, lo) < tol, (k, lm, lo)
        _close(gm, go, tol, f"gradients at step {k}")
        # gradients() changes nothing: weights and state bit-identical, and a second call gives the same numbers
        _close(m.get_weights(), w0, 0, "weights after gradients()")
        _close(m.get_state(), s0, 0, "state after gradients()")
        lm2, gm2 = m.gradients(xs[k], ys[k])
        assert lm2 == lm and all(np.array_equal(a, b) for a, b in zip(gm, gm2))
        assert scaled_error(m.train_step(xs[k], ys[k]), o.train_step(xs[k], ys[k])) < tol
        _close(m.get_weights(), o.get_weights(), tol, f"weights after step {k}")
        _close(m.get_state(), o.get_state(), tol, f"state after step {k}")
        assert not np.allclose(m.get_state()[1], s0[1])  # the moving variance really moved
    assert scaled_error(m.train_steps(xs[4:], ys[4:]), o.train_steps(xs[4:], ys[4:])) < tol
    _close(m.get_weights(), o.get_weights(), tol, "weights after train_steps")
    _close(m.get_state(), o.get_state(), tol, "state after train_steps")
    assert scaled_error(m.predict(xs[0]), o.predict(xs[0])) < tol  # inference mode: moving statistics, no dropout


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_aligned_float32_close_to_the_oracle(backend):
    w = init_weights(CONV, 3)
    m = _mod(backend).Model(CONV, w, BuildOptions(dtype="float32", seed=7))
    o = ref.Model(CONV, w, BuildOptions(dtype="float64", seed=7))
    xs, ys = _data(CONV, steps=3, batch=4)
    for x, y in zip(xs, ys):
        assert scaled_error(m.train_step(x, y), o.train_step(x, y)) < 1e-5
    _close(m.get_weights(), o.get_weights(), 1e-4, "weights")
    _close(m.get_state(), o.get_state(), 1e-5, "state")
    assert all(s.dtype == np.float32 for s in m.get_state())


def test_tf2_traces_once_with_masks_and_state():
    m = _mod("tf2").Model(CONV, init_weights(CONV, 0), BuildOptions(dtype="float64", seed=1))
    for batch in (1, 4, 3):
        xs, ys = _data(CONV, steps=2, batch=batch)
        m.train_steps(xs, ys)
        m.gradients(xs[0], ys[0])
        m.predict(xs[0])
    assert m._step.experimental_get_tracing_count() == 1
    assert m._grads.experimental_get_tracing_count() == 1
    assert m.info["tracing_count"] == 1


def test_tables_cover_the_vocabulary():
    for name in BACKENDS:
        mod = _mod(name)
        assert set(LAYERS.values()) <= set(mod.LAYER_BUILDERS), name
        assert set(OPTIMIZERS.values()) <= set(mod.OPTIMIZER_BUILDERS), name
        assert all(callable(b) for b in mod.LAYER_BUILDERS.values())


@dataclass(frozen=True)
class Dummy(Layer):
    def output_shape(self, in_shape):
        return tuple(in_shape)


@dataclass(frozen=True)
class Lion:  # an optimizer outside the vocabulary
    lr: float = 0.01


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_an_unknown_layer_or_optimizer_is_unsupported(backend):
    mod = _mod(backend)
    spec = _spec("dummy", (5,), [Dense(3), Dummy(), Dense(2)], Loss("sse", "mean"), SGD(lr=0.1))
    with pytest.raises(Unsupported, match=f"{backend} has no Dummy"):
        mod.Model(spec, init_weights(spec, 0), BuildOptions(dtype="float64"))
    spec = dataclasses.replace(DENSE, optimizer=Lion())
    with pytest.raises(Unsupported, match=f"{backend} has no Lion"):
        mod.Model(spec, init_weights(DENSE, 0), BuildOptions(dtype="float64"))


# ---------------------------------------------------------------------------------------------------- native mode
def _bn_input(spec, w, x):
    """The BatchNorm layer's input (the first layer's output) and n, the values per feature."""
    z = ref.forward(np, dataclasses.replace(spec, layers=spec.layers[:1]), w[:1], x)[0]
    z2 = z.reshape(-1, z.shape[-1])
    return z2, len(z2)


def _native_state_after_one_step(backend, spec, dtype, batch=4):
    w = init_weights(spec, 3)
    m = _mod(backend).Model(spec, w, BuildOptions(dtype=dtype, mode="native", seed=2))
    xs, ys = _data(spec, steps=1, batch=batch)
    m.gradients(xs[0], ys[0])
    assert all(np.array_equal(s, i) for s, i in zip(m.get_state(), [np.zeros(s[0]) if k == 0 else np.ones(s[0])
                                                                     for k, s in enumerate(spec.state_shapes())]))
    m.train_step(xs[0], ys[0])
    z2, n = _bn_input(spec, w, xs[0])
    mean, var = z2.mean(0), z2.var(0)
    return m, m.get_state(), mean, var, n


def test_tf1_native_fused_batchnorm_stores_the_unbiased_variance():
    """4-D float32 input: tf.compat.v1.layers.batch_normalization's fused path (FusedBatchNormV3)."""
    m, (mm, mv), mean, var, n = _native_state_after_one_step("tf1", CONV, "float32")
    decay = np.float64(np.float32(1) - np.float32(0.99))  # momentum a float32 tensor: 1 - f32(0.99)
    assert np.allclose(mm, mean * decay, rtol=1e-5, atol=1e-7)
    expect = 1 - (1 - var * n / (n - 1)) * decay
    assert np.max(np.abs(mv - expect)) < 1e-6
    biased = 1 - (1 - var) * decay
    assert np.min(np.abs(mv - biased)) > 2e-5  # the Bessel factor 36/35 is measurable here
    diffs = m.info["native_differences"]
    assert any("moving variance unbiased" in d and "fused" in d for d in diffs), diffs
    assert "Dropout masks from TensorFlow's RNG: trajectories not comparable" in diffs


def test_tf1_native_plain_batchnorm_float64():
    """2-D float64 input: the plain path, biased variance, 1 - 0.99 made a float32 tensor, epsilon the double 1e-3."""
    m, (mm, mv), mean, var, n = _native_state_after_one_step("tf1", DENSE, "float64")
    decay = float(np.float32(1.0 - 0.99))
    assert scaled_error(mm, 0 - (0 - mean) * decay) < 1e-12
    assert scaled_error(mv, 1 - (1 - var) * decay) < 1e-12
    spec_like = 0.9 * 1 + var * n / (n - 1) * (1 - 0.9)  # what the spec (momentum 0.9, unbiased) would store
    assert np.min(np.abs(mv - spec_like)) > 1e-3
    diffs = m.info["native_differences"]
    assert any("moving variance biased (spec unbiased" in d for d in diffs), diffs
    assert any(d.startswith("BatchNorm (layer 1) epsilon 0.001 (spec 0.001000000047") for d in diffs), diffs


def test_tf2_native_batchnorm_follows_keras_defaults():
    m, (mm, mv), mean, var, n = _native_state_after_one_step("tf2", DENSE, "float64")
    assert scaled_error(mm, 0 * 0.99 + mean * (1.0 - 0.99)) < 1e-12
    assert scaled_error(mv, 1 * 0.99 + var * (1.0 - 0.99)) < 1e-12
    diffs = m.info["native_differences"]
    assert any("moving variance biased (spec unbiased" in d for d in diffs), diffs
    assert any(d.startswith("BatchNorm (layer 1) momentum 0.99 (spec 0.9)") for d in diffs), diffs
    assert "BatchNorm" in m.info["batchnorm"] and "Keras" in m.info["batchnorm"]


DROP = _spec("drop", (2000,), [Dropout(0.3), Dense(1, use_bias=False)], Loss("sse", "sum"), SGD(lr=0.0))


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_native_dropout_keeps_1_minus_p_scaled_and_predict_is_deterministic(backend):
    p = 0.3
    w = [np.ones((2000, 1))]
    m = _mod(backend).Model(DROP, w, BuildOptions(dtype="float64", mode="native", seed=5))
    assert "Dropout masks from TensorFlow's RNG: trajectories not comparable" in m.info["native_differences"]
    x = np.random.default_rng(0).uniform(1.0, 2.0, size=(1, 2000))
    y = np.zeros((1, 1))
    kept_sets = []
    for _ in range(2):
        loss, (g,) = m.gradients(x, y)
        g = g[:, 0]
        kept = g != 0
        dropped_x = np.where(kept, x[0] / (1 - p), 0.0)
        out = dropped_x.sum()
        # d loss / d kernel = dropout(x) * 2 * (out - y): every value 0 or x/(1-p) times the same factor
        assert np.allclose(g, dropped_x * 2 * out, rtol=1e-12), backend
        assert abs(loss - out**2) < 1e-9 * out**2
        assert abs(kept.mean() - (1 - p)) < 0.05, kept.mean()
        kept_sets.append(kept)
    assert not np.array_equal(*kept_sets)  # the framework's RNG draws a new mask per pass
    a, b = m.predict(x), m.predict(x)
    assert np.array_equal(a, b) and scaled_error(a[0, 0], x.sum()) < 1e-12  # inference: no dropout, no scaling


def test_tf2_xla_step_with_batchnorm_and_masks_matches_the_oracle():
    """fast mode: the same step under tf.function(jit_compile=True)."""
    w = init_weights(CONV, 3)
    m = _mod("tf2").Model(CONV, w, BuildOptions(dtype="float64", seed=7, fast=True))
    o = ref.Model(CONV, w, BuildOptions(dtype="float64", seed=7))
    assert m.info["jit_compile"] is True
    xs, ys = _data(CONV, steps=3, batch=4)
    assert scaled_error(m.train_steps(xs, ys), o.train_steps(xs, ys)) < 1e-12
    _close(m.get_weights(), o.get_weights(), 1e-12, "weights")
    _close(m.get_state(), o.get_state(), 1e-12, "state")


# ------------------------------------------------------------------------- the hazards vocabulary, aligned (float64)
# Each spec against the oracle: loss and every gradient before each step, weights after it, predictions at the end.
VOCAB = {
    # stride-2 'same' convolution on an odd input (pads (1, 1)), 'same' average pooling at stride 1 (pads (0, 1)),
    # softmax output with the sparse CCE on probabilities, class weights and L2
    "conv_same_odd": _spec("conv_same_odd", (5, 5, 1),
                           [Conv2D(2, (3, 3), "tanh", "same", strides=(2, 2)), AveragePooling2D(2, 1, "same"),
                            Flatten(), Dense(3, "softmax")],
                           Loss("sparse_categorical_crossentropy", "mean", (1.0, 2.0, 0.5), l2=f32(1e-2)), SGD(0.1)),
    # stride-2 'same' convolution on an even input (pads (0, 1)), LayerNorm on channels, exact gelu, 'same' average
    # pooling 3x3 stride 2 (windows of 4, 6 and 9 in-image values), an overlapping max pool, MSE
    "conv_same_even": _spec("conv_same_even", (6, 6, 2),
                            [Conv2D(3, (3, 3), padding="same", strides=(2, 2)), LayerNorm(), Activation("gelu"),
                             AveragePooling2D(3, 2, "same"), MaxPool2D(2, strides=1), Flatten(), Dense(2)],
                            Loss("mse", "mean"), SGD(0.1)),
    # LayerNorm with its own epsilon, leaky_relu, tanh, tanh-approximate gelu, class weights with a zero, L2
    "dense_acts": _spec("dense_acts", (5,),
                        [Dense(6), LayerNorm(f32(1e-2)), Activation("leaky_relu", negative_slope=f32(0.1)),
                         Dense(4, "tanh"), Activation("gelu", approximate="tanh"), Dense(3)],
                        Loss("softmax_crossentropy", "mean", (0.5, 0.0, 2.0), l2=f32(1e-3)), SGD(0.2)),
    # an Activation("softmax") layer under the sparse CCE, reduction sum
    "softmax_layer": _spec("softmax_layer", (5,), [Dense(4, "sigmoid"), Dense(3), Activation("softmax")],
                           Loss("sparse_categorical_crossentropy", "sum"), SGD(0.1)),
}
VOCAB_CASES = [("conv_same_odd", 1), ("conv_same_odd", 4), ("conv_same_even", 4), ("dense_acts", 4),
               ("softmax_layer", 3)]


def _lockstep(m, o, xs, ys, tol=1e-12, weight_floor=None):
    """Loss and gradients before each step, loss of the step, weights after it; predictions at the end."""
    for k, (x, y) in enumerate(zip(xs, ys)):
        lm, gm = m.gradients(x, y)
        lo, go = o.gradients(x, y)
        assert scaled_error(lm, lo) < tol, (k, lm, lo)
        _close(gm, go, tol, f"gradients at step {k}")
        assert scaled_error(m.train_step(x, y), o.train_step(x, y)) < tol, k
        for j, (a, b) in enumerate(zip(m.get_weights(), o.get_weights(), strict=True)):
            err = scaled_error(a, b, floor=weight_floor or 1e-300)
            assert err < tol, (f"weights {j} after step {k}", err)
    assert scaled_error(m.predict(xs[0]), o.predict(xs[0])) < tol


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("name,batch", VOCAB_CASES, ids=[f"{s}-b{b}" for s, b in VOCAB_CASES])
def test_aligned_vocabulary_matches_the_oracle(backend, name, batch):
    spec = VOCAB[name]
    w = init_weights(spec, 4)
    m, o = _mod(backend).Model(spec, w, BuildOptions(dtype="float64")), ref.Model(spec, w, BuildOptions())
    xs, ys = _data(spec, steps=3, batch=batch, seed=1)
    _lockstep(m, o, xs, ys)


def test_same_padding_and_pool_windows_are_tfs():
    """The shapes the spec's rules give (and so the oracle's): TF's 'SAME' at stride 2 pads (1, 1) on 5 and (0, 1) on
    6 (the extra row at the bottom); a 'same' 3x3 average at stride 2 over 3x3 averages 4 values in the first window."""
    from models.spec import same_padding

    assert same_padding(5, 3, 2) == (1, 1) and same_padding(6, 3, 2) == (0, 1) and same_padding(3, 3, 2) == (1, 1)
    assert VOCAB["conv_same_even"].shapes()[:4] == [(3, 3, 3), (3, 3, 3), (3, 3, 3), (2, 2, 3)]
    import tensorflow as tf

    x = np.arange(9.0).reshape(1, 3, 3, 1)
    got = tf.nn.avg_pool2d(tf.constant(x), 3, 2, "SAME").numpy()[0, :, :, 0]
    want = [[np.mean([0, 1, 3, 4]), np.mean([1, 2, 4, 5])], [np.mean([3, 4, 6, 7]), np.mean([4, 5, 7, 8])]]
    assert np.array_equal(got, want)  # padded zeros are not counted


# optimizer cases: every optimizer form, a schedule crossing a boundary (lr x0.5 every 2 updates) and clipping small
# enough to bite (max norm 0.05; the gradients' norms are ~0.5-2 here), both scopes
OPT_CASES = {
    "sgd_accumulator": SGD(0.1, f32(0.9)),
    "sgd_accumulator_nesterov": SGD(0.1, f32(0.9), nesterov=True),
    "sgd_velocity": SGD(0.1, f32(0.9), momentum_form="velocity"),
    "sgd_velocity_nesterov": SGD(0.1, f32(0.9), nesterov=True, momentum_form="velocity"),
    "adam_schedule": Adam(f32(0.01)),
    "rmsprop_inside": RMSprop(f32(0.01)),
    "rmsprop_inside_v0": RMSprop(f32(0.01), initial_accumulator=f32(0.5)),
    "rmsprop_outside": RMSprop(f32(0.01), epsilon=f32(1e-3), epsilon_inside_sqrt=False, initial_accumulator=f32(0.5)),
    "adagrad_inside": Adagrad(f32(0.05)),
    "adagrad_outside": Adagrad(f32(0.05), initial_accumulator=0.0, epsilon=f32(1e-3), epsilon_inside_sqrt=False),
    "adagrad_no_epsilon": Adagrad(f32(0.05), epsilon=0.0),
    "adamw_times_lr": AdamW(f32(0.01), weight_decay=f32(0.5)),
    "adamw_no_lr": AdamW(f32(0.01), weight_decay=f32(0.02), decay_times_lr=False),
    "adamw_eps_v_hat": AdamW(f32(0.01), epsilon=f32(1e-3), convention="eps_v_hat", weight_decay=f32(0.5)),
}
# what info["optimizer"] starts with: the built-in where it computes the spec, TF ops where it cannot
OPT_IMPL = {
    "tf2": {"sgd_accumulator": "hand-written", "sgd_accumulator_nesterov": "hand-written",
            "sgd_velocity": "built-in keras.optimizers.SGD", "sgd_velocity_nesterov": "built-in keras.optimizers.SGD",
            "adam_schedule": "built-in keras.optimizers.Adam", "rmsprop_inside": "built-in keras.optimizers.RMSprop",
            "rmsprop_inside_v0": "hand-written", "rmsprop_outside": "hand-written",
            "adagrad_inside": "built-in keras.optimizers.Adagrad", "adagrad_outside": "hand-written",
            "adagrad_no_epsilon": "built-in keras.optimizers.Adagrad",
            "adamw_times_lr": "built-in keras.optimizers.AdamW", "adamw_no_lr": "hand-written decay",
            "adamw_eps_v_hat": "hand-written AdamW"},
    "tf1": {"sgd_accumulator": "built-in tf.compat.v1.train.MomentumOptimizer",
            "sgd_accumulator_nesterov": "built-in tf.compat.v1.train.MomentumOptimizer",
            "sgd_velocity": "hand-written", "sgd_velocity_nesterov": "hand-written",
            "adam_schedule": "built-in tf.compat.v1.train.AdamOptimizer",
            "rmsprop_inside": "built-in tf.compat.v1.train.RMSPropOptimizer",
            "rmsprop_inside_v0": "built-in tf.compat.v1.train.RMSPropOptimizer", "rmsprop_outside": "hand-written",
            "adagrad_inside": "hand-written", "adagrad_outside": "hand-written",
            "adagrad_no_epsilon": "built-in tf.compat.v1.train.AdagradOptimizer",
            "adamw_times_lr": "hand-written decay", "adamw_no_lr": "hand-written decay",
            "adamw_eps_v_hat": "hand-written decay"},
}
OPT_CLIP = {"sgd_accumulator": "global", "sgd_velocity_nesterov": "per_tensor", "rmsprop_inside": "per_tensor",
            "adagrad_inside": "global", "adamw_times_lr": "per_tensor"}


def _opt_spec(name):
    clip = OPT_CLIP.get(name)
    return _spec(f"opt_{name}", (5,), [Dense(3, "tanh"), Dense(2)], Loss("sse", "mean"), OPT_CASES[name]
                 ).with_overrides(schedule=StepDecay(2, f32(0.5)), clip=clip and ClipNorm(f32(0.05), clip))


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("name", list(OPT_CASES))
def test_aligned_optimizers_schedule_and_clip_match_the_oracle(backend, name):
    spec = _opt_spec(name)
    w = init_weights(spec, 2)
    m, o = _mod(backend).Model(spec, w, BuildOptions(dtype="float64")), ref.Model(spec, w, BuildOptions())
    assert m.info["optimizer"].startswith(OPT_IMPL[backend][name]), m.info["optimizer"]
    xs, ys = _data(spec, steps=5, batch=4, seed=3)
    if spec.clip is not None:  # the clip bites at the first step
        g = o.gradients(xs[0], ys[0])[1]
        norms = [np.sqrt(sum((a * a).sum() for a in g))] if spec.clip.scope == "global" else [
            np.sqrt((a * a).sum()) for a in g]
        assert min(norms) > 2 * spec.clip.max_norm, norms
    # weights scaled by no less than the learning rate (a bias passing through zero must not make an ulp a failure)
    _lockstep(m, o, xs, ys, weight_floor=float(spec.optimizer.lr))
