"""The JAX backend's native mode, one framework default at a time (issue 13, the porting-hazards atlas).

For every ``backends.base.NATIVE_KEYS`` key JAX has, ``extra["native_only"] = [key]`` applies that default alone, and
the test checks that it changes exactly what it should: the first optimizer update against its closed form *and*
against optax itself run directly on the same gradient (the framework's default measured here, not copied), the
forward pass against the framework's formula, and ``info["native_settings"]`` names the key (only it) with the
framework's API and value.  Keys whose default equals the spec (conv 'same', clipping epsilon, the optax losses, XLA's
precision on the CPU) and the keys JAX does not have (class weights, L2, BatchNorm: written by the pure-JAX user)
change nothing, bit for bit.  float32, in this process (float64 needs JAX_ENABLE_X64 before JAX is imported; the
float64 schedule check is in tests/test_vocab_jax.py).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from backends.base import NATIVE_KEYS, BuildOptions
from models import init_weights
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
)


def _jax():
    pytest.importorskip("jax")
    pytest.importorskip("optax")
    import backends.jax_jit as jb

    return jb


def _spec(input_shape, layers, loss=None, optimizer=None, init=None, **kw) -> ModelSpec:
    s = ModelSpec(name="hazard_probe", description="issue 13 native-key test", input_shape=input_shape,
                  layers=tuple(layers), loss=loss or Loss("sse", "sum"), optimizer=optimizer or SGD(0.1),
                  init=init or Init("glorot_uniform", "uniform", 0.1), dataset="toy_431", batch_sizes=(2, 4), epochs=1,
                  expected_params=0, **kw)
    return s.with_overrides(expected_params=s.param_count())


def _model(spec, native_only=None, mode="native", weights=None, dtype="float32"):
    jb = _jax()
    extra = {} if native_only is None else {"native_only": list(native_only)}
    return jb.Model(spec, init_weights(spec, 0) if weights is None else weights,
                    BuildOptions(dtype=dtype, mode=mode, extra=extra))


# ------------------------------------------------------------------------------ optimizers: the first update
# One weight w (Dense(1) without bias on x = 1), SSE against y: g = 2*(w - y).  From w = 0, y = -0.05: g = 0.1.
def _one_weight(optimizer, w0=0.0, **kw) -> ModelSpec:
    return _spec((1,), [Dense(1, use_bias=False)], optimizer=optimizer, init=Init(explicit=((w0,),)), **kw)


def _first_update(spec, native_only=None, mode="native", y=-0.05):
    m = _model(spec, native_only, mode)
    x, yy = np.ones((1, 1), np.float32), np.full((1, 1), y, np.float32)
    g = float(m.gradients(x, yy)[1][0][0, 0])
    w0 = float(m.get_weights()[0][0, 0])
    m.train_step(x, yy)
    return float(m.get_weights()[0][0, 0]) - w0, g, m.info


def _optax_first_update(tx, g, w0=0.0) -> float:
    """optax itself, run on the same gradient in float32: the framework's default measured, not copied."""
    import jax.numpy as jnp
    import optax

    p = jnp.float32(w0)
    upd, _ = tx.update(jnp.float32(g), tx.init(p), p)
    return float(optax.apply_updates(p, upd) - p)


def _rms(lr, g, rho, eps, inside, v0):
    v = rho * v0 + (1 - rho) * g * g
    return -lr * g / (math.sqrt(v + eps) if inside else math.sqrt(v) + eps)


def _adagrad(lr, g, a0, eps, inside):
    a = a0 + g * g
    return -lr * g / (math.sqrt(a + eps) if inside else math.sqrt(a) + eps)


LR = f32(1e-3)
# a torch-flavoured spec RMSprop: every key differs from optax's decay 0.9, eps 1e-8 inside, initial_scale 0
RMS_SPEC = RMSprop(LR, rho=f32(0.5), epsilon=f32(1e-2), epsilon_inside_sqrt=False, initial_accumulator=1.0)
RMS_CASES = {  # key -> (expected native_settings value, (rho, eps, inside, v0) with that key's default applied)
    "rmsprop_rho": ("optax.rmsprop(decay=0.9)", (0.9, RMS_SPEC.epsilon, False, 1.0)),
    "rmsprop_epsilon": ("optax.rmsprop(eps=1e-08, eps_in_sqrt=True)", (RMS_SPEC.rho, 1e-8, True, 1.0)),
    "rmsprop_accumulator": ("optax.rmsprop(initial_scale=0)", (RMS_SPEC.rho, RMS_SPEC.epsilon, False, 0.0)),
}


@pytest.mark.parametrize("key", list(RMS_CASES))
def test_native_rmsprop_keys_one_at_a_time(key):
    spec = _one_weight(RMS_SPEC)
    setting, (rho, eps, inside, v0) = RMS_CASES[key]
    native, g, info = _first_update(spec, [key])
    aligned, _, aligned_info = _first_update(spec, mode="aligned")
    want_aligned = _rms(LR, g, RMS_SPEC.rho, RMS_SPEC.epsilon, False, 1.0)
    assert aligned == pytest.approx(want_aligned, rel=2e-6)
    assert native == pytest.approx(_rms(LR, g, rho, eps, inside, v0), rel=2e-6)
    assert abs(native - aligned) > 1e-3 * abs(aligned)  # the default changes the update
    assert info["native_settings"] == {key: setting}
    assert "native_settings" not in aligned_info
    assert info["optimizer"].startswith("built-in optax.rmsprop")


def test_native_rmsprop_all_defaults_is_optax_rmsprop():
    """RMSprop(lr 1e-3) with the spec's (Keras') defaults on g = 0.1: the native update is optax.rmsprop(1e-3)'s own
    (-3.16e-3: optax keeps Keras' rho 0.9, eps inside); only the epsilon value differs (1e-8 vs 1e-7)."""
    import optax

    spec = _one_weight(RMSprop(LR))
    native, g, info = _first_update(spec)
    assert native == pytest.approx(_optax_first_update(optax.rmsprop(LR), g), rel=1e-6)
    assert native == pytest.approx(-3.16e-3, rel=1e-3)
    assert info["native_settings"] == {"rmsprop_epsilon": "optax.rmsprop(eps=1e-08, eps_in_sqrt=True)"}
    # the same update, torch's way (eps outside) from optax's own switch, is what the aligned run gives for that spec
    torch_like = _one_weight(RMSprop(LR, rho=f32(0.99), epsilon=f32(1e-8), epsilon_inside_sqrt=False))
    aligned, g, _ = _first_update(torch_like, mode="aligned")
    assert aligned == pytest.approx(-1.0e-2, rel=1e-3)  # torch's golden first step


ADAGRAD_SPEC = Adagrad(f32(1e-2), initial_accumulator=0.0, epsilon=f32(1e-10), epsilon_inside_sqrt=False)  # torch's
ADAGRAD_CASES = {
    "adagrad_accumulator": ("optax.adagrad(initial_accumulator_value=0.1)", (0.1, ADAGRAD_SPEC.epsilon, False)),
    "adagrad_epsilon": ("optax.adagrad(eps=1e-07) (inside the square root)", (0.0, 1e-7, True)),
}


@pytest.mark.parametrize("key", list(ADAGRAD_CASES))
def test_native_adagrad_keys_one_at_a_time(key):
    spec = _one_weight(ADAGRAD_SPEC)
    setting, (a0, eps, inside) = ADAGRAD_CASES[key]
    native, g, info = _first_update(spec, [key])
    aligned, _, _ = _first_update(spec, mode="aligned")
    assert aligned == pytest.approx(-1.0e-2, rel=1e-6)  # torch's golden first step: lr * g / |g|
    assert native == pytest.approx(_adagrad(ADAGRAD_SPEC.lr, g, a0, eps, inside), rel=2e-6)
    assert info["native_settings"] == {key: setting}


def test_native_adagrad_all_defaults_is_optax_adagrad():
    import optax

    native, g, info = _first_update(_one_weight(ADAGRAD_SPEC))
    assert native == pytest.approx(_optax_first_update(optax.adagrad(f32(1e-2)), g), rel=1e-6)
    assert native == pytest.approx(-3.0e-3, rel=1e-2)  # Keras' golden first step: optax has Keras' defaults
    assert set(info["native_settings"]) == {"adagrad_accumulator", "adagrad_epsilon"}
    # the spec's defaults are optax's: nothing differs
    _, _, info = _first_update(_one_weight(Adagrad(f32(1e-2))))
    assert info["native_settings"] == {}


def test_native_adam_epsilon_and_convention():
    """First Adam step on g: eps_v_hat moves lr*g/(|g| + eps), eps_hat lr*g/(|g| + eps/sqrt(1 - b2)); a large spec
    eps (1e-2) makes both keys visible.  optax.adam's eps is 1e-8 on sqrt(v_hat)."""
    import optax

    eps = f32(1e-2)
    spec = _one_weight(Adam(LR, epsilon=eps, convention="eps_hat"))
    aligned, g, _ = _first_update(spec, mode="aligned")
    assert aligned == pytest.approx(-LR * g / (g + eps / math.sqrt(1 - spec.optimizer.beta2)), rel=2e-6)
    native, _, info = _first_update(spec, ["adam_epsilon"])  # 1e-8, still eps_hat
    assert native == pytest.approx(-LR * g / (g + 1e-8 / math.sqrt(1 - spec.optimizer.beta2)), rel=2e-6)
    assert info["native_settings"] == {"adam_epsilon": "optax.adam(eps=1e-08)"}
    native, _, info = _first_update(spec, ["adam_convention"])  # eps on sqrt(v_hat), still 1e-2
    assert native == pytest.approx(-LR * g / (g + eps), rel=2e-6)
    assert info["native_settings"] == {"adam_convention": "optax.adam: eps added to sqrt(v_hat) (eps_v_hat)"}
    assert info["optimizer"].startswith("built-in optax.adam")
    # all of optax.adam's defaults: its b1 = 0.9, b2 = 0.999 are Python doubles (adam_one_minus_beta), and in float32
    # the moment update's 1 - b is rounded from the double while the bias correction uses the cast b: the first
    # update is lr*g/(|g| + eps) off by 6.5e-6 relative (measured on optax.adam itself)
    native, _, info = _first_update(spec)
    measured = _optax_first_update(optax.adam(LR), g)
    assert native == pytest.approx(measured, rel=1e-6)
    assert measured != pytest.approx(-LR * g / (g + 1e-8), rel=1e-6)
    assert set(info["native_settings"]) == {"adam_epsilon", "adam_convention", "adam_one_minus_beta"}
    native, _, info = _first_update(spec, ["adam_one_minus_beta"])
    m, v = np.float32(1 - 0.9) * np.float32(g), np.float32(1 - 0.999) * np.float32(g) ** 2  # 1 - b from the double
    alpha = LR * math.sqrt(1 - 0.999) / (1 - 0.9)
    assert native == pytest.approx(-alpha * m / (math.sqrt(v) + eps), rel=1e-6)
    assert native != pytest.approx(aligned, rel=1e-6)
    assert info["native_settings"]["adam_one_minus_beta"].startswith("optax.adam(b1=0.9, b2=0.999) (Python doubles")
    assert any("1 - Adam beta_2 from the Python double" in d for d in info["native_differences"])


def test_native_adamw_weight_decay_and_form():
    """A zero gradient (w = 1 = y): the first AdamW update is the decay alone, -lr*wd*w (or -wd*w).  optax.adamw's
    weight_decay is 1e-4, times the learning rate (measured on optax.adamw directly).  lr 0.5, so that float32 (ulp 6e-8
    at w = 1) resolves lr * 1e-4 to 0.1%."""
    import optax

    lr, wd = f32(0.5), f32(0.1)
    spec = _one_weight(AdamW(lr, weight_decay=wd, convention="eps_v_hat", decay_times_lr=False), w0=1.0)
    measured = _optax_first_update(optax.adamw(lr), 0.0, w0=1.0)
    assert measured == pytest.approx(-lr * 1e-4, rel=2e-3)
    aligned, g, info = _first_update(spec, mode="aligned", y=1.0)
    assert g == 0 and aligned == pytest.approx(-wd, rel=1e-6)
    assert info["optimizer"].startswith("hand-written decay")
    native, _, info = _first_update(spec, ["adamw_weight_decay"], y=1.0)
    assert native == pytest.approx(-1e-4, rel=2e-3)  # 1e-4 * w, not times lr (the spec's form)
    assert info["native_settings"] == {"adamw_weight_decay": "optax.adamw(weight_decay=0.0001)"}
    native, _, info = _first_update(spec, ["adamw_decay_form"], y=1.0)
    assert native == pytest.approx(-lr * wd, rel=1e-5)
    assert list(info["native_settings"]) == ["adamw_decay_form"]
    assert info["optimizer"].startswith("built-in optax.adamw")
    native, _, info = _first_update(spec, y=1.0)
    assert native == measured
    assert set(info["native_settings"]) == {"adamw_weight_decay", "adamw_decay_form", "adam_epsilon",
                                            "adam_one_minus_beta"}


# Saturated softmax probe: x = 1, logits W + b with W = (1e4, -1e4) and label 1, so softmax = (1, 0) exactly and the
# bias gradient is exactly (1, -1) at every step (the kernel moves by lr per step: the logits stay saturated): the bias
# trajectory shows the learning rate and the momentum form exactly.
def _saturated(optimizer, schedule=None, b0=(1.0, -1.0)) -> ModelSpec:
    return _spec((1,), [Dense(2)], loss=Loss("softmax_crossentropy", "mean"), optimizer=optimizer,
                 init=Init(explicit=((1e4, -1e4), b0)), schedule=schedule)


def _bias_trajectory(spec, native_only=None, mode="native", steps=4, dtype="float32"):
    m = _model(spec, native_only, mode, dtype=dtype)
    x, y = np.ones((1, 1)), np.ones(1, np.int64)
    out = []
    for _ in range(steps):
        assert np.array_equal(m.gradients(x, y)[1][1], [1.0, -1.0])
        m.train_step(x, y)
        out.append(float(m.get_weights()[1][0]))
    return out, m.info


def test_native_momentum_form_is_the_accumulator():
    """SGD momentum 0.9 from w = 1 at g = 1, lr 0.1, 0.1, 0.01, 0.01: the spec's velocity form (Keras) ends at 0.356,
    optax.sgd's accumulator (torch, TF1) at 0.649."""
    spec = _saturated(SGD(0.1, f32(0.9), momentum_form="velocity"), StepDecay(2, f32(0.1)))
    aligned, info = _bias_trajectory(spec, mode="aligned")
    assert info["optimizer"].startswith("hand-written SGD, velocity form")
    native, info = _bias_trajectory(spec, ["momentum_form"])
    assert aligned[-1] == pytest.approx(0.3561, abs=1e-4)
    assert native[-1] == pytest.approx(0.64851, abs=1e-4)
    assert native[:2] == pytest.approx(aligned[:2], abs=1e-6)  # equal until the learning rate changes
    assert info["native_settings"] == {"momentum_form": "optax.sgd(lr, momentum=0.9, nesterov=False)"}
    assert info["optimizer"].startswith("built-in optax.sgd(momentum=0.9")
    # the accumulator spec is optax's form: nothing differs
    _, info = _bias_trajectory(_saturated(SGD(0.1, f32(0.9)), StepDecay(2, f32(0.1))), ["momentum_form"])
    assert info["native_settings"] == {}


def test_native_lr_schedule_is_optax_exponential_decay():
    """optax.exponential_decay(staircase=True) computes lr_t in float32 from its int32 count: factor**k rounded in
    float32, where the spec rounds lr*factor**k (a double) once.  Update t of a model whose count is set to t moves the
    bias (g = 1 exactly, from 0) to exactly -lr_t: the native lr_t is optax's schedule bit for bit, the aligned one the
    spec's."""
    import jax.numpy as jnp
    import optax

    spec = _saturated(SGD(0.1), StepDecay(1, f32(0.1)), b0=(0.0, 0.0))
    schedule = optax.exponential_decay(0.1, 1, f32(0.1), staircase=True)
    optax_lr = [float(np.float32(schedule(jnp.asarray(t, jnp.int32)))) for t in range(4)]
    spec_lr = [float(np.float32(spec.lr_at(t))) for t in range(4)]
    assert optax_lr != spec_lr  # measured: the two roundings part at t = 1

    def lrs(native_only, mode):
        out = []
        for t in range(4):
            m = _model(spec, native_only, mode)
            m.t = t  # update t: t updates applied before it
            assert np.array_equal(m.gradients(np.ones((1, 1)), np.ones(1, np.int64))[1][1], [1.0, -1.0])
            m.train_step(np.ones((1, 1)), np.ones(1, np.int64))
            out.append(-float(m.get_weights()[1][0]))
        return out, m.info

    assert lrs(None, "aligned")[0] == spec_lr
    native, info = lrs(["lr_schedule"], "native")
    assert native == optax_lr
    assert "optax.exponential_decay(0.1, 1, 0.1, staircase=True)" == info["native_settings"]["lr_schedule"]
    assert list(info["native_settings"]) == ["lr_schedule"]
    # a schedule whose values float32 computes the same way: nothing differs
    _, info = _bias_trajectory(_saturated(SGD(0.5), StepDecay(2, 0.5), b0=(0.0, 0.0)), ["lr_schedule"])
    assert info["native_settings"] == {}


# ---------------------------------------------------------------------------------------------------- clipping
def _clip_probe(scope: str) -> ModelSpec:
    # Dense(2) on x = 1 with SSE against y = (-1, 2): kernel and bias gradients 2*(b + k - y), norms ~2.5 each
    return _spec((1,), [Dense(2)], optimizer=SGD(1.0), init=Init(explicit=((0.5, -0.25), (0.0, 0.0))),
                 clip=ClipNorm(f32(0.5), scope))


def _clipped_update(spec, native_only=None, mode="native"):
    m = _model(spec, native_only, mode)
    x, y = np.ones((1, 1), np.float32), np.array([[-1.0, 2.0]], np.float32)
    grads = m.gradients(x, y)[1]
    w0 = m.get_weights()
    m.train_step(x, y)
    return [a - b for a, b in zip(m.get_weights(), w0)], grads, m.info


def test_native_clip_scope_is_optax_global_norm():
    import jax.numpy as jnp
    import optax

    spec = _clip_probe("per_tensor")
    aligned, grads, info = _clipped_update(spec, mode="aligned")
    assert info["clip"].startswith("hand-written per tensor")
    for d, g in zip(aligned, grads):  # each tensor to norm 0.5 on its own
        np.testing.assert_allclose(-d, g * (0.5 / np.linalg.norm(g)), rtol=1e-6)
    native, grads, info = _clipped_update(spec, ["clip_scope"])
    tx = optax.clip_by_global_norm(0.5)
    measured = tx.update([jnp.asarray(g) for g in grads], tx.init(None))[0]
    total = math.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in grads))
    for d, g, mg in zip(native, grads, measured):
        np.testing.assert_allclose(-d, np.asarray(mg), rtol=1e-6)
        np.testing.assert_allclose(-d, g * (0.5 / total), rtol=1e-6)  # optax's: g * max/||all||, no epsilon
    assert info["native_settings"] == {"clip_scope": "optax.clip_by_global_norm(0.5)"}


def test_native_clip_epsilon_changes_nothing():
    """optax.clip_by_global_norm adds no epsilon to the norm (measured: the clipped norm is max_norm to rounding), so
    clip_epsilon is the spec's: bit-identical updates, no native setting, a note saying so."""
    import jax.numpy as jnp
    import optax

    g = [jnp.asarray([3.0, 4.0], jnp.float32)]
    tx = optax.clip_by_global_norm(1.0)
    assert float(jnp.linalg.norm(tx.update(g, tx.init(None))[0][0])) == pytest.approx(1.0, abs=1e-7)  # torch: 1 - 2e-7
    spec = _clip_probe("global")
    aligned, _, info = _clipped_update(spec, mode="aligned")
    assert info["clip"].startswith("built-in optax.clip_by_global_norm")
    native, _, info = _clipped_update(spec, ["clip_epsilon"])
    assert all(np.array_equal(a, b) for a, b in zip(aligned, native))
    assert info["native_settings"] == {}
    assert any("adds no epsilon" in d for d in info["native_differences"])


# ------------------------------------------------------------------------------------------- forward-pass keys
def _identity_probe(n, layer, **kw) -> ModelSpec:
    """x -> Dense(n) with an identity kernel and zero bias -> ``layer``: predict shows the layer on x itself."""
    eye = tuple(np.eye(n).ravel())
    return _spec((n,), [Dense(n), layer], init=Init(explicit=(eye, (0.0,) * n)), **kw)


X = np.array([[-3.0, -1.0, -0.25, 0.0, 0.5, 2.0]], np.float32)


def _predict(spec, native_only=None, mode="native", x=X):
    m = _model(spec, native_only, mode)
    return m.predict(x).astype(np.float64), m.info


def test_native_leaky_relu_slope_is_jax_nn_default():
    spec = _identity_probe(6, Activation("leaky_relu"))  # the spec's slope 0.2
    aligned, _ = _predict(spec, mode="aligned")
    native, info = _predict(spec, ["leaky_relu_slope"])
    x = X.astype(np.float64)
    np.testing.assert_allclose(aligned, np.where(x > 0, x, 0.2 * x), rtol=1e-6)
    np.testing.assert_allclose(native, np.where(x > 0, x, 0.01 * x), rtol=1e-6)
    assert info["native_settings"] == {"leaky_relu_slope": "jax.nn.leaky_relu(negative_slope=0.01)"}
    _, info = _predict(_identity_probe(6, Activation("leaky_relu", f32(0.01))), ["leaky_relu_slope"])
    assert info["native_settings"] == {}  # the spec asks for jax's slope: no difference


def test_native_gelu_is_the_tanh_approximation():
    spec = _identity_probe(6, Activation("gelu"))  # the spec's exact gelu
    aligned, _ = _predict(spec, mode="aligned")
    native, info = _predict(spec, ["gelu_approximation"])
    x = X.astype(np.float64)[0]
    exact = np.array([0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in x])
    approx = 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    np.testing.assert_allclose(aligned[0], exact, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(native[0], approx, rtol=1e-6, atol=1e-7)
    assert np.max(np.abs(native - aligned)) > 1e-4  # 4.7e-4 at |x| = 2.7: visible
    assert info["native_settings"] == {"gelu_approximation": "jax.nn.gelu(approximate=True)"}
    _, info = _predict(_identity_probe(6, Activation("gelu", approximate="tanh")), ["gelu_approximation"])
    assert info["native_settings"] == {}


def test_native_layernorm_epsilon_is_flax_default():
    spec = _spec((4,), [LayerNorm()])  # gamma 1, beta 0; the spec's epsilon 1e-3
    x = np.array([[0.01, -0.02, 0.03, 0.0]], np.float32)  # small variance: epsilon dominates
    xd = x.astype(np.float64)
    xc = xd - xd.mean()
    for native_only, eps in ((["layernorm_epsilon"], 1e-6), (None, 1e-6)):
        out, info = _predict(spec, native_only, x=x)
        np.testing.assert_allclose(out, xc / np.sqrt((xc**2).mean() + eps), rtol=1e-4)
        assert info["native_settings"] == {"layernorm_epsilon": "flax.linen.LayerNorm(epsilon=1e-06)"}
    out, _ = _predict(spec, mode="aligned", x=x)
    np.testing.assert_allclose(out, xc / np.sqrt((xc**2).mean() + f32(1e-3)), rtol=1e-5)


def test_native_avgpool_counts_padded_zeros_like_flax():
    """AveragePooling2D(3, 2, 'same') on a 5x5 ones image: the spec averages the in-image values (all ones); flax's
    avg_pool(count_include_pad=True) divides every window by 9: 4/9 at the corners... (TF pads (1, 1) here)."""
    spec = _spec((5, 5, 1), [AveragePooling2D(3, 2, "same"), Flatten()])
    x = np.ones((1, 5, 5, 1), np.float32)
    aligned, _ = _predict(spec, mode="aligned", x=x)
    native, info = _predict(spec, ["avgpool_count_pad"], x=x)
    np.testing.assert_array_equal(aligned, 1.0)
    inside = np.array([2, 3, 2])  # in-image rows (columns) of each window: pads (1, 1)
    np.testing.assert_allclose(native.reshape(3, 3), np.outer(inside, inside) / 9, rtol=1e-6)
    assert info["native_settings"] == {
        "avgpool_count_pad": "flax.linen.avg_pool(padding='SAME', count_include_pad=True)"}
    # no padding at all ('same' 2/2 on an even image, or 'valid'): nothing to count, nothing differs
    for layer, shape in ((AveragePooling2D(2, 2, "same"), (4, 4, 1)), (AveragePooling2D(3, 2), (5, 5, 1))):
        s = _spec(shape, [layer, Flatten()])
        xi = np.random.default_rng(0).normal(size=(2, *shape)).astype(np.float32)
        a, _ = _predict(s, mode="aligned", x=xi)
        n, info = _predict(s, ["avgpool_count_pad"], x=xi)
        np.testing.assert_allclose(n, a, rtol=1e-6)
        assert info["native_settings"] == {}


# ------------------------------------------------------------------------- keys whose default is the spec's
NO_DIFFERENCE = {  # key -> a spec that exercises it; JAX's default computes the spec there
    "conv_same_padding": _spec((6, 6, 2), [Conv2D(2, (3, 3), "tanh", "same", strides=2), Flatten(), Dense(2)]),
    "loss_form": _spec((3,), [Dense(3)], loss=Loss("softmax_crossentropy", "mean")),
    "matmul_precision": _spec((5, 5, 2), [Conv2D(2, (3, 3)), Flatten(), Dense(2)]),
    "clip_epsilon": _spec((3,), [Dense(2)], clip=ClipNorm(f32(0.01))),
    # what the pure-JAX user writes by hand: the spec
    "class_weight_denominator": _spec((3,), [Dense(3)], loss=Loss("softmax_crossentropy", "mean", (1.0, 2.0, 0.5))),
    "l2_regularization": _spec((3,), [Dense(2)], loss=Loss("sse", "mean", l2=f32(0.01))),
    "sparse_cce_probabilities": _spec((3,), [Dense(3, "softmax")],
                                      loss=Loss("sparse_categorical_crossentropy", "mean")),
    "batchnorm_momentum": _spec((3,), [Dense(4), BatchNorm(), Dense(2)]),
    "mse_broadcast": _spec((3,), [Dense(1)], loss=Loss("mse", "mean")),
    "batchnorm_epsilon": _spec((3,), [Dense(4), BatchNorm(), Dense(2)]),
    "batchnorm_variance": _spec((3,), [Dense(4), BatchNorm(), Dense(2)]),
    "lr_precision": _spec((3,), [Dense(2)], optimizer=SGD(0.05)),
}


@pytest.mark.parametrize("key", list(NO_DIFFERENCE))
def test_native_keys_that_change_nothing(key):
    """Bit-identical losses, weights and predictions over two steps, and no native setting; on the CPU XLA's default
    precision is full precision; optax's losses are the spec's stable formulas (to rounding)."""
    spec = NO_DIFFERENCE[key]
    w = init_weights(spec, 3)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, *spec.input_shape)).astype(np.float32)
    y = rng.integers(0, spec.n_outputs, 4) if spec.loss.integer_labels else rng.normal(size=(4, spec.n_outputs))
    runs = []
    for mode, only in (("aligned", None), ("native", [key])):
        m = _model(spec, only, mode, weights=w)
        runs.append(([m.train_step(x, y), m.train_step(x, y)], m.get_weights(), m.predict(x), m.info))
    (la, wa, pa, _), (ln, wn, pn, info) = runs
    if key == "loss_form":  # optax's stable formulas: the spec's mathematics, rounded their own way
        np.testing.assert_allclose(ln, la, rtol=1e-6)
        for a, b in zip(wa, wn):
            np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-7)
        assert any("already stable from logits" in d for d in info["native_differences"])
    else:
        assert la == ln and np.array_equal(pa, pn) and all(np.array_equal(a, b) for a, b in zip(wa, wn))
    assert info["native_settings"] == {}


def test_every_native_key_is_known():
    """The keys this file switches on are NATIVE_KEYS keys (a typo would be a ValueError from ModelBase)."""
    used = set(RMS_CASES) | set(ADAGRAD_CASES) | set(NO_DIFFERENCE) | {
        "adam_epsilon", "adam_convention", "adamw_weight_decay", "adamw_decay_form", "momentum_form", "lr_schedule",
        "clip_scope", "leaky_relu_slope", "gelu_approximation", "layernorm_epsilon", "avgpool_count_pad",
        "adam_one_minus_beta"}
    assert used <= set(NATIVE_KEYS)


def test_native_only_keys_do_not_share_executables():
    """Two native models of one spec with different keys must not run each other's compiled step (the cache key holds
    the active keys): each follows its own closed form."""
    spec = _one_weight(RMS_SPEC)
    first, g, _ = _first_update(spec, ["rmsprop_rho"])
    second, _, info = _first_update(spec, ["rmsprop_epsilon"])
    assert first == pytest.approx(_rms(LR, g, 0.9, RMS_SPEC.epsilon, False, 1.0), rel=2e-6)
    assert second == pytest.approx(_rms(LR, g, RMS_SPEC.rho, 1e-8, True, 1.0), rel=2e-6)
