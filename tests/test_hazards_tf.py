"""Native mode of tf1 (graph + Session) and tf2 (GradientTape), one framework default at a time.

``BuildOptions(mode="native", extra={"native_only": [key]})`` applies only ``key``'s default; each test checks that it
changes exactly what it should -- the first update (or a few) equals the closed form of the framework's default, the
layer's output its formula -- that the aligned run does not, and that ``info["native_settings"]`` names that key and
no other.  The keys a framework has no default of its own for change nothing, bit for bit.
"""

from __future__ import annotations

import dataclasses
import importlib
import math

import numpy as np
import pytest

pytest.importorskip("tensorflow")

import backends.numpy_scratch as ref  # noqa: E402
from backends.base import BuildOptions  # noqa: E402
from models.spec import (  # noqa: E402
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


def _spec(name, input_shape, layers, loss, optimizer, init=None, **kw) -> ModelSpec:
    s = ModelSpec(name=name, description="test", input_shape=input_shape, layers=tuple(layers), loss=loss,
                  optimizer=optimizer, init=init or Init("normal", "normal", 0.5), dataset="none", batch_sizes=(2, 4),
                  epochs=1, expected_params=0, dtype="float64", **kw)
    return dataclasses.replace(s, expected_params=s.param_count())


def _build(backend, spec, keys=None, dtype="float64", seed=0):
    """Aligned (``keys`` None) or native with only ``keys``."""
    opts = (BuildOptions(dtype=dtype, seed=seed) if keys is None else
            BuildOptions(dtype=dtype, seed=seed, mode="native", extra={"native_only": list(keys)}))
    return _mod(backend).Model(spec, init_weights(spec, 1), opts)


def _only(m, key):
    """The run names ``key`` and nothing else among its native settings, and says what it changed."""
    assert set(m.info["native_settings"]) == {key}, m.info["native_settings"]
    assert m.info["native_differences"], m.info


# ------------------------------------------------------------------------------------- optimizers: the first update
# one weight w0 = 1, x = 1, y = 0.95, sum of squares: g = 2 * (w - 0.95) = 0.1
X1, Y1 = np.array([[1.0]]), np.array([[0.95]])


def _one(opt, **kw) -> ModelSpec:
    return _spec("one", (1,), [Dense(1, use_bias=False)], Loss("sse", "sum"), opt, Init(explicit=((1.0,),)), **kw)


def _first_update(m):
    g = float(m.gradients(X1, Y1)[1][0].item())
    w0 = float(m.get_weights()[0].item())
    m.train_step(X1, Y1)
    return g, w0, float(m.get_weights()[0].item()) - w0


def _adam_first(g, lr, eps):
    b1, b2 = f32(0.9), f32(0.999)
    m, v = (1 - b1) * g, (1 - b2) * g * g
    return -(m * (lr * math.sqrt(1 - b2) / (1 - b1))) / (math.sqrt(v) + eps)


LR3, LR2 = f32(1e-3), f32(1e-2)
RHO, EPS7, ACC = f32(0.9), f32(1e-7), f32(0.1)  # the spec's defaults
# (backend, key, spec optimizer, the native first update as a function of (g, w0)), sources in the backends' docstrings
FIRST = [
    ("tf2", "rmsprop_rho", RMSprop(LR3, rho=f32(0.5)), lambda g, w: -LR3 * g / math.sqrt((1 - 0.9) * g * g + EPS7)),
    ("tf1", "rmsprop_rho", RMSprop(LR3, rho=f32(0.5)), lambda g, w: -LR3 * g / math.sqrt((1 - RHO) * g * g + EPS7)),
    ("tf2", "rmsprop_epsilon", RMSprop(LR3, epsilon=f32(1e-3), epsilon_inside_sqrt=False),
     lambda g, w: -LR3 * g / math.sqrt((1 - RHO) * g * g + 1e-7)),
    ("tf1", "rmsprop_epsilon", RMSprop(LR3, epsilon=f32(1e-3), epsilon_inside_sqrt=False),
     lambda g, w: -LR3 * g / math.sqrt((1 - RHO) * g * g + f32(1e-10))),
    ("tf2", "rmsprop_accumulator", RMSprop(LR3, initial_accumulator=f32(0.5)),
     lambda g, w: -LR3 * g / math.sqrt((1 - RHO) * g * g + EPS7)),
    # TF1's "rms" slot starts at 1.0: -1.05e-4 instead of Keras' -3.16e-3
    ("tf1", "rmsprop_accumulator", RMSprop(LR3), lambda g, w: -LR3 * g / math.sqrt(RHO + (1 - RHO) * g * g + EPS7)),
    ("tf2", "adagrad_accumulator", Adagrad(LR2, initial_accumulator=0.0),  # Keras' Constant(0.1): float32 first
     lambda g, w: -LR2 * g / math.sqrt(f32(0.1) + g * g + EPS7)),
    ("tf2", "adagrad_accumulator", Adagrad(LR2, initial_accumulator=0.0, epsilon=f32(1e-3), epsilon_inside_sqrt=False),
     lambda g, w: -LR2 * g / (math.sqrt(f32(0.1) + g * g) + f32(1e-3))),  # hand-written with Keras' start
    ("tf1", "adagrad_accumulator", Adagrad(LR2, initial_accumulator=0.0),
     lambda g, w: -LR2 * g / math.sqrt(0.1 + g * g + EPS7)),
    ("tf2", "adagrad_epsilon", Adagrad(LR2, epsilon=f32(1e-3), epsilon_inside_sqrt=False),
     lambda g, w: -LR2 * g / math.sqrt(ACC + g * g + 1e-7)),
    ("tf1", "adagrad_epsilon", Adagrad(LR2, epsilon=f32(1e-3), epsilon_inside_sqrt=False),  # no epsilon at all
     lambda g, w: -LR2 * g / math.sqrt(ACC + g * g)),
    ("tf2", "adam_epsilon", Adam(LR2, epsilon=f32(1e-3)), lambda g, w: _adam_first(g, LR2, 1e-7)),
    ("tf1", "adam_epsilon", Adam(LR2, epsilon=f32(1e-3)), lambda g, w: _adam_first(g, LR2, f32(1e-8))),
    ("tf2", "adam_convention", Adam(LR2, epsilon=f32(1e-3), convention="eps_v_hat"),
     lambda g, w: _adam_first(g, LR2, f32(1e-3))),
    ("tf1", "adam_convention", Adam(LR2, epsilon=f32(1e-3), convention="eps_v_hat"),
     lambda g, w: _adam_first(g, LR2, f32(1e-3))),
    ("tf2", "adamw_weight_decay", AdamW(LR2, weight_decay=f32(0.5)),  # Keras casts 0.004 via float32
     lambda g, w: -LR2 * f32(0.004) * w + _adam_first(g, LR2, EPS7)),
    ("tf2", "adamw_decay_form", AdamW(LR2, weight_decay=f32(0.5), decay_times_lr=False),
     lambda g, w: -LR2 * f32(0.5) * w + _adam_first(g, LR2, EPS7)),
    ("tf2", "lr_precision", SGD(0.05), lambda g, w: -f32(0.05) * g),  # Keras' float32 learning-rate variable
    ("tf1", "lr_precision", SGD(0.05), lambda g, w: -f32(0.05) * g),  # TF1's float32 tensor
]


@pytest.mark.parametrize("backend,key,opt,expected", FIRST, ids=[f"{b}-{k}" for b, k, _, _ in FIRST])
def test_native_first_update_is_the_frameworks_default(backend, key, opt, expected):
    spec = _one(opt)
    m = _build(backend, spec, [key])
    _only(m, key)
    g, w0, d = _first_update(m)
    assert abs(g - 0.1) < 1e-12
    want = expected(g, w0)
    assert abs(d - want) <= 1e-10 * abs(want), (d, want)
    aligned = _build(backend, spec)
    assert "native_settings" not in aligned.info
    _, _, d_aligned = _first_update(aligned)
    assert abs(d_aligned - want) > 1e-8 * abs(want), (d_aligned, want)  # the default is what moved it


def test_tf1_rmsprop_accumulator_golden_number():
    """RMSprop lr 1e-3 on g = 0.1, first update: TF1 -1.05e-4 (its accumulator starts at 1), Keras -3.16e-3."""
    _, _, d1 = _first_update(_build("tf1", _one(RMSprop(LR3)), ["rmsprop_accumulator"]))
    _, _, d2 = _first_update(_build("tf2", _one(RMSprop(LR3)), ["rmsprop_accumulator"]))
    assert round(d1, 6) == -1.05e-4 and round(d2, 5) == -3.16e-3, (d1, d2)


@pytest.mark.parametrize("backend,key,opt", [("tf2", "adagrad_accumulator", Adagrad(LR2)),
                                             ("tf2", "adamw_weight_decay", AdamW(LR2)),
                                             ("tf1", "rmsprop_rho", RMSprop(LR3))])
def test_a_default_equal_to_the_spec_records_nothing(backend, key, opt):
    """Keras' Constant(0.1) accumulator and its weight decay 0.004 reach a float64 run through float32 (ops.cast of a
    Python float): f32(0.1) and f32(0.004), the spec's own defaults; TF1's decay 0.9 becomes f32(0.9)."""
    m = _build(backend, _one(opt), [key])
    assert m.info["native_settings"] == {} and m.info["native_differences"] == []


def test_tf2_adam_one_minus_beta_in_float32():
    """Keras' Adam(beta_1=0.9): 1 - 0.9 from the Python double is 0.1f, the spec's 1 - f32(0.9) is 0.100000024f."""
    spec = _one(Adam(LR2))
    m = _build("tf2", spec, ["adam_one_minus_beta"], dtype="float32")
    _only(m, "adam_one_minus_beta")
    assert any(d.startswith("1 - Adam beta_1 from the Python double") for d in m.info["native_differences"])
    _, _, d = _first_update(m)
    _, _, d_aligned = _first_update(_build("tf2", spec, dtype="float32"))
    # v's 1 - 0.999 (0.001f against 0.00099998713f) moves the update by 6e-6 relative
    assert d != d_aligned and abs(d - d_aligned) < 1e-5 * abs(d)


# ------------------------------------------------------------------------------------- a few updates, simulated
def _simulate(spec, steps, lr_of, update):
    """w after ``steps`` updates of the one-weight model: g = 2 * (w - 0.95), ``update(w, g, lr, state)``."""
    w, state = 1.0, {}
    for t in range(steps):
        w = update(w, 2 * (w - 0.95), lr_of(t), state)
    return w


def _momentum(form, mu, nesterov):
    def update(w, g, lr, s):
        b = s.get("b", 0.0)
        if form == "accumulator":
            b = mu * b + g
            w -= lr * (g + mu * b) if nesterov else lr * b
        else:
            b = mu * b - lr * g
            w += mu * b - lr * g if nesterov else b
        s["b"] = b
        return w
    return update


def _run(m, steps):
    for _ in range(steps):
        m.train_step(X1, Y1)
    return float(m.get_weights()[0].item())


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("backend,spec_form,native_form", [("tf2", "accumulator", "velocity"),
                                                           ("tf1", "velocity", "accumulator")])
def test_native_momentum_form_after_a_learning_rate_change(backend, spec_form, native_form, nesterov):
    """lr 0.1 x0.1 every update: the two forms agree at a constant rate and part after a change."""
    mu = f32(0.9)
    spec = _one(SGD(0.1, mu, nesterov, spec_form), schedule=StepDecay(1, f32(0.1)))
    m = _build(backend, spec, ["momentum_form"])
    _only(m, "momentum_form")
    w_native, w_aligned = _run(m, 4), _run(_build(backend, spec), 4)
    want = _simulate(spec, 4, spec.lr_at, _momentum(native_form, mu, nesterov))
    spec_w = _simulate(spec, 4, spec.lr_at, _momentum(spec_form, mu, nesterov))
    assert abs(w_native - want) < 1e-12 and abs(w_aligned - spec_w) < 1e-12, (w_native, want, w_aligned, spec_w)
    assert abs(want - spec_w) > 1e-3


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_native_lr_schedule_is_computed_in_float32(backend):
    """Keras ExponentialDecay / tf.compat.v1.train.exponential_decay with the Python 0.1: float32 (0.5 ** k exact)."""
    spec = _one(SGD(0.1), schedule=StepDecay(1, f32(0.5)))
    m = _build(backend, spec, ["lr_schedule"])
    _only(m, "lr_schedule")
    assert "float32" in m.info["native_differences"][0]

    def sgd(w, g, lr, s):
        return w - lr * g

    want = _simulate(spec, 3, lambda t: f32(0.1) * 0.5**t, sgd)
    assert abs(_run(m, 3) - want) < 1e-14
    assert abs(_run(_build(backend, spec), 3) - _simulate(spec, 3, spec.lr_at, sgd)) < 1e-14
    assert abs(want - _simulate(spec, 3, spec.lr_at, sgd)) > 1e-10


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_native_clip_scope_is_global(backend):
    """Per-tensor clipping in the spec; TF code writes tf.clip_by_global_norm."""
    spec = _spec("clip", (1,), [Dense(1)], Loss("sse", "sum"), SGD(0.1), Init(explicit=((1.0,), (0.5,))),
                 clip=ClipNorm(f32(0.05), "per_tensor"))
    x, y = np.array([[2.0]]), np.array([[0.95]])
    m = _build(backend, spec, ["clip_scope"])
    _only(m, "clip_scope")
    g = np.array([a.item() for a in m.gradients(x, y)[1]])  # unclipped: (6.2, 3.1)
    assert np.allclose(g, [6.2, 3.1], rtol=1e-12)
    m.train_step(x, y)
    got = np.array([a.item() for a in m.get_weights()]) - [1.0, 0.5]
    assert np.allclose(got, -0.1 * g * (f32(0.05) / np.linalg.norm(g)), rtol=1e-12, atol=0)
    a = _build(backend, spec)
    a.train_step(x, y)
    assert np.allclose(np.array([w.item() for w in a.get_weights()]) - [1.0, 0.5], -0.1 * f32(0.05), rtol=1e-12)


# ------------------------------------------------------------------------------------------------ layers and losses
def _identity_then(layers, n=3, **kw):
    """Dense(n) with an identity kernel and zero bias, then ``layers`` (gamma ones, beta zeros): predict = layers(x)."""
    explicit = [tuple(np.eye(n).ravel()), (0.0,) * n]
    explicit += [(1.0,) * n, (0.0,) * n] * sum(type(layer) is LayerNorm for layer in layers)
    return _spec("identity", (n,), [Dense(n), *layers], Loss("sse", "mean"), SGD(0.1), Init(explicit=tuple(explicit)),
                 **kw)


XN = np.array([[-1.0, 2.0, -3.0], [0.5, -0.25, 1.5]])


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_native_leaky_relu_slope(backend):
    spec = _identity_then([Activation("leaky_relu", negative_slope=f32(0.05))])
    m = _build(backend, spec, ["leaky_relu_slope"])
    _only(m, "leaky_relu_slope")
    slope = f32(0.2)  # tf.nn.leaky_relu's alpha=0.2 is a float32 op attribute: f32(0.2) in a float64 run
    assert np.array_equal(m.predict(XN), np.where(XN > 0, XN, slope * XN))
    assert np.array_equal(_build(backend, spec).predict(XN), np.where(XN > 0, XN, f32(0.05) * XN))
    # the spec's own default slope is f32(0.2): what tf.nn.leaky_relu applies, so nothing to record
    assert _build(backend, _identity_then([Activation("leaky_relu")]), ["leaky_relu_slope"]).info[
        "native_settings"] == {}


def _gelu_exact(x):
    return np.vectorize(lambda v: 0.5 * v * (1 + math.erf(v / math.sqrt(2))))(x)


def _gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def test_tf2_native_gelu_is_tf_nn_gelu():
    """tf.nn.gelu: exact by default; its 1/sqrt(2) is math_ops.cast from a Python float, float32 in a float64 run."""
    spec = _identity_then([Activation("gelu", approximate="tanh")])
    m = _build("tf2", spec, ["gelu_approximation"])
    _only(m, "gelu_approximation")
    got, exact, approx = m.predict(XN), _gelu_exact(XN), _gelu_tanh(XN)
    assert scaled_error(got, exact) < 1e-7 and scaled_error(got, approx) > 1e-4
    assert scaled_error(_build("tf2", spec).predict(XN), approx) < 1e-15
    exact_spec = _identity_then([Activation("gelu")])
    m = _build("tf2", exact_spec, ["gelu_approximation"])
    assert m.info["native_differences"] == [
        "gelu (layer 1): tf.nn.gelu's 1/sqrt(2) rounded to float32 (0.7071067690849304) in a float64 run"]
    assert 1e-10 < scaled_error(m.predict(XN), exact) < 1e-7  # tf.nn.gelu's float32 constant, measured
    half = 0.5 * XN * _erfc(-XN * float(np.float32(1 / math.sqrt(2))))
    assert scaled_error(m.predict(XN), half) < 1e-14
    assert scaled_error(_build("tf2", exact_spec).predict(XN), exact) < 1e-15
    assert _build("tf2", exact_spec, ["gelu_approximation"], dtype="float32").info["native_settings"] == {}


def _erfc(x):
    return np.vectorize(math.erfc)(x)


def test_tf2_native_layernorm_epsilon():
    spec = _identity_then([LayerNorm(f32(0.1))])
    m = _build("tf2", spec, ["layernorm_epsilon"])
    _only(m, "layernorm_epsilon")

    def ln(eps):
        c = XN - XN.mean(-1, keepdims=True)
        return c / np.sqrt((c * c).mean(-1, keepdims=True) + eps)

    assert scaled_error(m.predict(XN), ln(1e-3)) < 1e-14  # Keras' LayerNormalization(epsilon=1e-3)
    assert scaled_error(_build("tf2", spec).predict(XN), ln(f32(0.1))) < 1e-14
    assert scaled_error(ln(1e-3), ln(f32(0.1))) > 1e-3


def test_tf2_native_sparse_cce_takes_the_softmax_logits():
    """keras.losses.sparse_categorical_crossentropy(y, softmax(z)) under tf.function: the loss of the logits, not
    clipped (16.118) and not -log(0) = inf (the spec's loss when p underflows)."""
    spec = _spec("cce", (1,), [Dense(2, "softmax", use_bias=False)], Loss("sparse_categorical_crossentropy", "mean"),
                 SGD(0.1), Init(explicit=((800.0, 0.0),)))
    x, y = np.array([[1.0]]), np.array([1])
    m = _build("tf2", spec, ["sparse_cce_probabilities"])
    _only(m, "sparse_cce_probabilities")
    assert "Softmax op" in m.info["native_settings"]["sparse_cce_probabilities"]
    assert m.gradients(x, y)[0] == 800.0
    assert _build("tf2", spec).gradients(x, y)[0] == np.inf
    z = np.array([[0.3, -0.2], [1.0, 2.0]])  # not saturated: the two formulas agree to rounding
    spec2 = dataclasses.replace(spec, input_shape=(2,), layers=(Dense(2, "softmax", use_bias=False),),
                                init=Init(explicit=(tuple(np.eye(2).ravel()),)))
    la = _build("tf2", spec2).gradients(z, np.array([0, 1]))[0]
    ln = _build("tf2", spec2, ["sparse_cce_probabilities"]).gradients(z, np.array([0, 1]))[0]
    assert abs(la - ln) < 1e-14 * abs(la)


def test_tf1_native_class_weights_divide_by_the_nonzero_weights():
    """tf.compat.v1.losses: SUM_BY_NONZERO_WEIGHTS (2 of the 4 samples have a nonzero weight), in float32."""
    spec = _spec("cw", (3,), [Dense(3)], Loss("softmax_crossentropy", "mean", (1.0, 0.0, 2.0)), SGD(0.1))
    x = np.random.default_rng(0).normal(size=(4, 3))
    y = np.array([0, 1, 2, 1])
    m = _build("tf1", spec, ["class_weight_denominator"])
    _only(m, "class_weight_denominator")
    assert any("nonzero weight" in d for d in m.info["native_differences"])
    assert any("float32" in d for d in m.info["native_differences"])
    a = _build("tf1", spec)
    ln, gn = m.gradients(x, y)
    la, ga = a.gradients(x, y)
    assert scaled_error(ln, 2 * la) < 1e-6 and scaled_error(ln, 2 * la) > 1e-12  # float32
    assert all(scaled_error(p, 2 * q) < 1e-6 for p, q in zip(gn, ga))
    # without a zero weight only the float32 reduction differs
    spec = dataclasses.replace(spec, loss=Loss("softmax_crossentropy", "mean", (1.0, 3.0, 2.0)))
    m = _build("tf1", spec, ["class_weight_denominator"])
    assert m.info["native_differences"] == [
        "class-weighted loss reduced in float32 (compute_weighted_loss casts the losses and weights)"]
    assert 1e-12 < scaled_error(m.gradients(x, y)[0], _build("tf1", spec).gradients(x, y)[0]) < 1e-6


def test_tf1_native_l2_is_half():
    """l2 * tf.nn.l2_loss(kernel) = l2 * sum(kernel**2) / 2: half the spec's penalty and gradient."""
    l2 = f32(0.01)
    spec = _spec("l2", (3,), [Dense(4, "tanh"), Dense(2)], Loss("sse", "mean", l2=l2), SGD(0.1))
    x = np.random.default_rng(0).normal(size=(4, 3))
    y = np.random.default_rng(1).normal(size=(4, 2))
    m, a = _build("tf1", spec, ["l2_regularization"]), _build("tf1", spec)
    _only(m, "l2_regularization")
    w = a.get_weights()
    (ln, gn), (la, ga) = m.gradients(x, y), a.gradients(x, y)
    half = l2 * sum((k * k).sum() for k in (w[0], w[2])) / 2
    assert scaled_error(ln, la - half) < 1e-14
    for j, (p, q) in enumerate(zip(gn, ga)):
        want = q - l2 * w[j] if j in (0, 2) else q  # the kernels' penalty gradient is l2 * w, not 2 * l2 * w
        assert scaled_error(p, want) < 1e-14, j


# ------------------------------------------------------------------------------------------------------- BatchNorm
DENSE = _spec("dense_bn", (5,), [Dense(4, use_bias=False), BatchNorm(momentum=f32(0.9), unbiased_moving_variance=True),
                                 Activation("sigmoid"), Dense(2)], Loss("sse", "mean"), SGD(0.05))
CONV = _spec("conv_bn", (6, 6, 2), [Conv2D(3, (3, 3), use_bias=False), BatchNorm(), Activation("relu"), MaxPool2D(2),
                                    Flatten(), Dense(3)], Loss("softmax_crossentropy", "mean"), SGD(0.05))


def _bn_stats(spec, x):
    z = ref.forward(np, dataclasses.replace(spec, layers=spec.layers[:1]), init_weights(spec, 1)[:1], x)[0]
    z2 = z.reshape(-1, z.shape[-1])
    n = len(z2)
    return z2.mean(0), z2.var(0), n


def _bn_state_after_one_step(backend, spec, keys, dtype="float64"):
    m = _build(backend, spec, keys, dtype=dtype)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, *spec.input_shape)) + 0.3
    y = rng.integers(0, 3, size=4) if spec.loss.integer_labels else rng.normal(size=(4, spec.n_outputs))
    m.train_step(x, y)
    return m, m.get_state(), _bn_stats(spec, x)


d99 = 1.0 - 0.99
BN_CASES = [  # (backend, key, expected (moving mean, moving variance) from (mean, biased var, n)); DENSE: float64
    ("tf2", "batchnorm_momentum", lambda mu, v, n: (mu * d99, 0.99 + v * n / (n - 1) * d99)),
    ("tf2", "batchnorm_variance", lambda mu, v, n: (mu * (1 - f32(0.9)), f32(0.9) + v * (1 - f32(0.9)))),
    ("tf1", "batchnorm_momentum", lambda mu, v, n: (mu * f32(d99), 1 - (1 - v * n / (n - 1)) * f32(d99))),
    ("tf1", "batchnorm_variance", lambda mu, v, n: (mu * (1 - f32(0.9)), f32(0.9) + v * (1 - f32(0.9)))),
]


@pytest.mark.parametrize("backend,key,expected", BN_CASES, ids=[f"{b}-{k}" for b, k, _ in BN_CASES])
def test_native_batchnorm_one_key(backend, key, expected):
    m, (mm, mv), (mu, v, n) = _bn_state_after_one_step(backend, DENSE, [key])
    _only(m, key)
    want_mm, want_mv = expected(mu, v, n)
    assert scaled_error(mm, want_mm) < 1e-12 and scaled_error(mv, want_mv) < 1e-12
    _, (am, av), _ = _bn_state_after_one_step(backend, DENSE, None)
    assert scaled_error(mv, av) > 1e-6


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_native_batchnorm_epsilon_alone(backend):
    """1e-3 as the framework applies it (the Python double in a float64 run; spec f32(1e-3)): the state is the
    aligned one, bit for bit, the output moves by ~1e-11."""
    m, state, _ = _bn_state_after_one_step(backend, DENSE, ["batchnorm_epsilon"])
    _only(m, "batchnorm_epsilon")
    assert m.info["native_differences"][0].startswith("BatchNorm (layer 1) epsilon 0.001 (spec 0.001000000047")
    _, aligned, _ = _bn_state_after_one_step(backend, DENSE, None)
    assert all(np.array_equal(a, b) for a, b in zip(state, aligned))


def test_tf1_fused_batchnorm_variance_alone():
    """4-D float32, only the stored variance native: the fused kernel's unbiased variance with the spec's momentum."""
    m, (mm, mv), (mu, v, n) = _bn_state_after_one_step("tf1", CONV, ["batchnorm_variance"], dtype="float32")
    _only(m, "batchnorm_variance")
    mom = f32(0.99)
    assert scaled_error(mm, mu * (1 - mom)) < 1e-6
    assert scaled_error(mv, mom + v * n / (n - 1) * (1 - mom)) < 1e-6
    assert np.min(np.abs(mv - (mom + v * (1 - mom)))) > 1e-5


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_native_dropout_rng_alone(backend):
    spec = _spec("drop", (20,), [Dropout(0.5), Dense(1)], Loss("sse", "mean"), SGD(0.1))
    m = _build(backend, spec, ["dropout_rng"], seed=3)
    _only(m, "dropout_rng")
    assert "native" in m.info["dropout"]
    x, y = np.ones((2, 20)), np.zeros((2, 1))
    assert not np.array_equal(m.gradients(x, y)[1][0], _build(backend, spec, seed=3).gradients(x, y)[1][0])


# ---------------------------------------------------------------------------------- keys without a default here
# Every hazard of the vocabulary in one small network; a key the framework has no default of its own for (its rule is
# the spec's, or it has no such API) must change nothing, bit for bit, and record nothing.
NOOP = _spec("noop", (6, 6, 1), [Conv2D(2, (3, 3), "relu", "same", strides=(2, 2)), AveragePooling2D(3, 2, "same"),
                                 Flatten(), Dense(4), LayerNorm(), Activation("gelu"), Dense(3, "softmax")],
             Loss("sparse_categorical_crossentropy", "mean", (1.0, 2.0, 0.5), l2=f32(1e-3)),
             AdamW(f32(1e-2), weight_decay=f32(0.1)), clip=ClipNorm(f32(0.1)))
NOOP_KEYS = {
    "tf2": ["conv_same_padding", "avgpool_count_pad", "class_weight_denominator", "l2_regularization", "loss_form",
            "mse_broadcast", "clip_epsilon", "matmul_precision"],
    "tf1": ["conv_same_padding", "avgpool_count_pad", "loss_form", "mse_broadcast", "clip_epsilon", "matmul_precision",
            "layernorm_epsilon", "gelu_approximation", "sparse_cce_probabilities", "adam_one_minus_beta",
            "adamw_weight_decay", "adamw_decay_form"],
}
_NOOP_RUNS: dict = {}


def _noop_run(backend, keys):
    m = _build(backend, NOOP, keys)
    rng = np.random.default_rng(0)
    for _ in range(2):
        m.train_step(rng.normal(size=(3, 6, 6, 1)), rng.integers(0, 3, size=3))
    return m, m.get_weights()


@pytest.mark.parametrize("backend,key", [(b, k) for b, ks in NOOP_KEYS.items() for k in ks])
def test_keys_without_a_framework_default_change_nothing(backend, key):
    if backend not in _NOOP_RUNS:
        _NOOP_RUNS[backend] = _noop_run(backend, None)[1]
    m, w = _noop_run(backend, [key])
    assert m.info["native_settings"] == {} and m.info["native_differences"] == []
    assert all(np.array_equal(a, b) for a, b in zip(w, _NOOP_RUNS[backend])), key


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_full_native_mode_names_every_default_it_applies(backend):
    """All keys at once on the hazards network (float64): the settings a TF user gets, by key."""
    m = _mod(backend).Model(NOOP, init_weights(NOOP, 1), BuildOptions(mode="native"))
    want = {"tf2": {"layernorm_epsilon", "gelu_approximation", "sparse_cce_probabilities", "adam_epsilon",
                    "adam_one_minus_beta", "adamw_weight_decay"},
            "tf1": {"adam_epsilon", "lr_precision", "class_weight_denominator", "l2_regularization"}}[backend]
    assert set(m.info["native_settings"]) == want, m.info["native_settings"]
