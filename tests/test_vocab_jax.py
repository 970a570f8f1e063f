"""The JAX backend on the whole spec vocabulary (issues 12 and 13): tables, every layer, loss and optimizer, clipping
and the schedule, aligned with the NumPy float64 oracle.

* Tables: ``LAYER_BUILDERS`` / ``OPTIMIZER_BUILDERS`` cover ``models.spec.LAYERS`` / ``OPTIMIZERS``; a layer or an
  optimizer the backend does not know is ``Unsupported`` ("jax has no Dummy") when the model is built.
* Aligned float64 against the NumPy oracle (same weights, same ``BuildOptions.seed``, so the same dropout masks): loss
  and gradients before every step, weights and BatchNorm state after the steps, predictions (inference mode), to 1e-12
  scaled, on Conv2D(use_bias=False) -> BatchNorm -> Activation -> MaxPool2D -> Flatten -> Dropout -> Dense (batch 1
  and 4) and Dense -> BatchNorm(unbiased) -> Activation -> Dense (batch 4); through the jitted step and through the
  ``lax.scan`` fast mode (stacked masks); ``gradients()`` moves nothing.  A second model of the same key with another
  seed runs the first one's executable (nothing per model is closed over) and still follows its own seed's oracle.
* Issue 13's vocabulary, the same way over 4 steps (``VOCAB``): Conv2D 'same' at stride 2 on an odd and an even input,
  MaxPool2D with strides, AveragePooling2D 'same' (padded on one side), LayerNorm, tanh / softmax / leaky_relu / gelu
  (both forms), mse, sparse CCE on a softmax output, class weights, L2, SGD momentum in both forms and Nesterov across
  a StepDecay boundary, RMSprop and Adagrad with epsilon inside and outside the square root, AdamW in both decay forms
  and both conventions, Adam under a schedule, ClipNorm global and per tensor at a max_norm that bites; some through
  the scan.  Each case also says which implementation ran (``info["optimizer"]``: optax's built-in or hand-written).
* Native mode: BatchNorm's moving statistics after one step follow the spec's formula (pure JAX has no BatchNorm
  default: native = spec), and dropout from ``jax.random`` keeps values in {0, x/(1-p)} at a kept fraction near
  1 - p, fixed within a step, new the next step, while predict is deterministic; in float64 the lr_schedule default
  (``optax.exponential_decay``) is float32-rounded.  The other native keys: tests/test_hazards_jax.py.

float64 JAX needs ``JAX_ENABLE_X64`` before JAX is imported: the ``f64`` tests, in a process without it, run once
together in a subprocess with it set (``pytest -k f64``) and each reports its own outcome from there.
"""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

import backends.numpy_scratch as ref
from backends.base import BuildOptions, Unsupported
from models import init_weights
from models.spec import (
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
    init_state,
)
from tests.lockstep import scaled_error  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def _jax():
    pytest.importorskip("jax")
    pytest.importorskip("optax")
    import backends.jax_jit as jb

    return jb




def _spec(name, input_shape, layers, loss, optimizer, batch_sizes=(1, 4), **kw) -> ModelSpec:
    spec = ModelSpec(name=name, description="vocabulary test", input_shape=input_shape, layers=tuple(layers),
                     loss=loss, optimizer=optimizer, init=Init("glorot_uniform", "uniform", 0.1), dataset="toy_431",
                     batch_sizes=batch_sizes, epochs=1, expected_params=0, **kw)
    return spec.with_overrides(expected_params=spec.param_count())


CONV = _spec("vocab_conv", (6, 6, 2),
             (Conv2D(3, (3, 3), use_bias=False), BatchNorm(), Activation("relu"), MaxPool2D(2), Flatten(),
              Dropout(0.5), Dense(3)),
             Loss("softmax_crossentropy", "mean"), Adam(lr=f32(0.01)))
DENSE = _spec("vocab_dense", (5,),
              (Dense(4), BatchNorm(momentum=f32(0.9), epsilon=f32(1e-5), unbiased_moving_variance=True),
               Activation("sigmoid"), Dense(2)),
              Loss("sse", "sum"), SGD(0.05), batch_sizes=(2, 4))
SPECS = {"conv": CONV, "dense": DENSE}


def _batch(spec, b, rng):
    x = rng.normal(size=(b, *spec.input_shape))
    y = rng.integers(0, spec.n_outputs, b) if spec.loss.integer_labels else rng.normal(size=(b, spec.n_outputs))
    return x, y


# ------------------------------------------------------------------------------------- float64 in an x64 process
@pytest.fixture(scope="module")
def x64_outcomes(tmp_path_factory) -> dict:
    """The ``f64`` tests of this file run in one subprocess with ``JAX_ENABLE_X64=1``: test name -> (outcome, text)."""
    xml = tmp_path_factory.mktemp("x64") / "junit.xml"
    env = {**os.environ, "JAX_ENABLE_X64": "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__)),
                           "-k", "f64", f"--junitxml={xml}"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    if not xml.exists():
        pytest.fail(f"the x64 subprocess wrote no report (rc {proc.returncode}):\n{proc.stdout[-3000:]}"
                    f"\n{proc.stderr[-3000:]}")
    out = {}
    for case in ET.parse(xml).getroot().iter("testcase"):
        kinds = [c for c in case if c.tag in ("failure", "error", "skipped")]
        out[case.get("name")] = ((kinds[0].tag, (kinds[0].get("message") or "") + "\n" + (kinds[0].text or ""))
                                 if kinds else ("passed", ""))
    return out


def _x64(request):
    """The backend module when this process has x64; otherwise the test's outcome in the x64 subprocess is reported
    here and None is returned (the caller returns)."""
    jb = _jax()
    if jb.x64_enabled():
        return jb
    outcome, text = request.getfixturevalue("x64_outcomes").get(request.node.name, ("missing", ""))
    if outcome == "skipped":
        pytest.skip(text)
    if outcome != "passed":
        pytest.fail(f"in the JAX_ENABLE_X64=1 subprocess: {outcome}\n{text}", pytrace=False)
    return None


F64_CASES = [("conv", 1, False), ("conv", 4, False), ("dense", 4, False), ("conv", 4, True), ("dense", 4, True)]


def _lockstep(jb, spec, b, fast, steps=3, tol=1e-12, seed=11):
    """``steps`` aligned float64 updates of the JAX model and the oracle from the same weights and masks: the loss and
    every gradient before each step (the loop), or the losses of one ``lax.scan`` over the stacked batches (after the
    first step's gradients), then the weights and the predictions.  Returns (model, oracle, the oracle's first
    gradients)."""
    w = init_weights(spec, 1)
    opts = dict(dtype="float64", seed=seed)
    m = jb.Model(spec, w, BuildOptions(fast=fast, **opts))
    o = ref.Model(spec, w, BuildOptions(**opts))
    rng = np.random.default_rng(5)
    batches = [_batch(spec, b, rng) for _ in range(steps)]
    first = None

    def check_gradients(x, y):
        loss, grads = m.gradients(x, y)
        loss_ref, grads_ref = o.gradients(x, y)
        assert abs(loss - loss_ref) <= tol * abs(loss_ref)
        assert len(grads) == len(grads_ref)
        # scaled by the largest gradient of the model too: the bias before a BatchNorm has a zero gradient in
        # exact arithmetic (the batch mean removes it), ~1e-17 of rounding in each implementation
        floor = max(np.max(np.abs(g)) for g in grads_ref)
        for g, gr in zip(grads, grads_ref):
            assert g.shape == gr.shape and scaled_error(g, gr, floor) < tol
        return loss, grads_ref

    if fast:  # one lax.scan over the stacked batches: the masks of steps 0, 1, ... stacked (k, B, ...)
        first = check_gradients(*batches[0])[1]
        xs, ys = np.stack([x for x, _ in batches]), np.stack([y for _, y in batches])
        assert scaled_error(m.train_steps(xs, ys), o.train_steps(xs, ys)) < tol
        assert "scan" in m.info["compile_s"] and "step" not in m.info["compile_s"]
    else:
        for x, y in batches:
            loss, grads_ref = check_gradients(x, y)
            first = grads_ref if first is None else first
            # gradients() changed nothing: the step that follows starts from the same weights, state and masks
            assert m.train_step(x, y) == loss
            o.train_step(x, y)
    assert m.t == o.t == steps
    for a, c in zip(m.get_weights(), o.get_weights(), strict=True):
        assert scaled_error(a, c) < tol
    x = _batch(spec, 3, rng)[0]
    assert scaled_error(m.predict(x), o.predict(x)) < tol
    assert np.array_equal(m.predict(x), m.predict(x))
    return m, o, first


@pytest.mark.parametrize("name,b,fast", F64_CASES, ids=[f"{n}-b{b}{'-scan' if f else ''}" for n, b, f in F64_CASES])
def test_f64_aligned_matches_oracle(name, b, fast, request):
    jb = _x64(request)
    if jb is None:
        return
    spec = SPECS[name]
    m, o, _ = _lockstep(jb, spec, b, fast)
    state, state_ref = m.get_state(), o.get_state()
    assert [s.shape for s in state] == [tuple(s) for s in spec.state_shapes()]
    for a, c in zip(state, state_ref, strict=True):
        assert scaled_error(a, c) < 1e-12
    assert not all(np.array_equal(a, c) for a, c in zip(state, init_state(spec)))  # the state moved


# Issue 13's vocabulary: name -> (spec, batch size, through the scan, what info["optimizer"] starts with).  Every
# schedule crosses a boundary within the 4 steps; every ClipNorm bites at the first step (checked).
MOMENTUM, DECAY = f32(0.9), StepDecay(2, f32(0.5))


def _mlp(name, optimizer, loss=None, **kw) -> ModelSpec:
    return _spec(name, (3,), (Dense(4, "tanh"), Dense(2)), loss or Loss("sse", "mean", l2=f32(0.01)), optimizer,
                 **kw)


VOCAB = {
    "conv_same_s2_odd": (_spec("conv_same_s2_odd", (5, 5, 2), (Conv2D(2, (3, 3), "tanh", "same", strides=2), Flatten(),
                                                                Dense(3)),
                               Loss("softmax_crossentropy", "mean"), SGD(0.1, MOMENTUM), schedule=DECAY),
                         4, False, "built-in optax.sgd(momentum=0.9, nesterov=False)"),
    "conv_same_s2_even": (_spec("conv_same_s2_even", (6, 6, 2),
                                (Conv2D(3, (3, 3), "relu", "same", strides=(2, 2)), MaxPool2D(2, strides=1), Flatten(),
                                 Dense(2)), Loss("mse", "mean"), SGD(0.05, MOMENTUM, momentum_form="velocity"),
                                schedule=DECAY),
                          4, False, "hand-written SGD, velocity form"),
    "avgpool_same_layernorm": (_spec("avgpool_same_layernorm", (5, 5, 1),
                                     (Conv2D(2, (2, 2)), AveragePooling2D(3, 2, "same"), LayerNorm(),
                                      Activation("gelu", approximate="tanh"), Flatten(), Dense(2)),
                                     Loss("sse", "sum"), RMSprop(f32(0.01))),
                               3, False, "built-in optax.rmsprop"),
    "avgpool_same_odd_scan": (_spec("avgpool_same_odd_scan", (5, 5, 1),
                                    (AveragePooling2D(2, 2, "same"), Conv2D(2, (2, 2), "tanh", "same"), Flatten(),
                                     Dense(2, "tanh")),
                                    Loss("mse", "mean"), Adagrad(f32(0.05), epsilon_inside_sqrt=False)),
                              4, True, "hand-written Adagrad, eps outside"),
    "mlp_sparse_cce": (_spec("mlp_sparse_cce", (4,),
                             (Dense(5), LayerNorm(), Activation("gelu"), Dense(4, "tanh"),
                              Activation("leaky_relu", f32(0.3)), Dense(3, "softmax")),
                             Loss("sparse_categorical_crossentropy", "mean", (1.0, 2.0, 0.5), l2=f32(0.01)),
                             AdamW(f32(0.01), weight_decay=f32(0.1)), clip=ClipNorm(f32(0.1))),
                       4, False, "hand-written, spec convention (eps_hat); AdamW decay w -= lr_t*0.1*w"),
    "mlp_softmax_scan": (_spec("mlp_softmax_scan", (4,), (Dense(4), Activation("softmax"), Dense(3)),
                               Loss("softmax_crossentropy", "sum", (0.5, 1.0, 3.0)),
                               AdamW(f32(0.01), convention="eps_v_hat"), clip=ClipNorm(f32(0.05), "per_tensor"),
                               schedule=DECAY),
                         4, True, "built-in optax.adamw"),
    "sgd_nesterov": (_mlp("sgd_nesterov", SGD(0.1, MOMENTUM, nesterov=True), schedule=DECAY), 4, False,
                     "built-in optax.sgd(momentum=0.9, nesterov=True)"),
    "sgd_nesterov_velocity": (_mlp("sgd_nesterov_velocity", SGD(0.1, MOMENTUM, True, "velocity"), schedule=DECAY), 4,
                              False, "hand-written SGD, velocity form (v = mu*v - lr_t*g; w += mu*v - lr_t*g)"),
    "sgd_velocity_scan": (_mlp("sgd_velocity_scan", SGD(0.1, MOMENTUM, momentum_form="velocity"), schedule=DECAY), 4,
                          True, "hand-written SGD, velocity form"),
    "rmsprop_outside_tf1_start": (_mlp("rmsprop_outside", RMSprop(f32(0.01), epsilon=f32(1e-3),
                                                                  epsilon_inside_sqrt=False, initial_accumulator=1.0),
                                       clip=ClipNorm(f32(0.05), "per_tensor")),
                                  4, False, "built-in optax.rmsprop"),
    "rmsprop_inside_clip": (_mlp("rmsprop_inside", RMSprop(f32(0.01), rho=f32(0.8), epsilon=f32(1e-3)),
                                 clip=ClipNorm(f32(0.05))), 4, False, "built-in optax.rmsprop"),
    "adagrad_inside": (_mlp("adagrad_inside", Adagrad(f32(0.05), epsilon=f32(1e-3)), schedule=DECAY), 4, False,
                       "built-in optax.adagrad"),
    "adagrad_outside": (_mlp("adagrad_outside", Adagrad(f32(0.05), 0.0, f32(1e-3), False)), 4, False,
                        "hand-written Adagrad, eps outside"),
    "adamw_v_hat": (_mlp("adamw_v_hat", AdamW(f32(0.01), weight_decay=f32(0.1), convention="eps_v_hat")), 4, False,
                    "built-in optax.adamw"),
    "adamw_v_hat_not_times_lr": (_mlp("adamw_v_hat_wd", AdamW(f32(0.01), weight_decay=f32(0.01), convention="eps_v_hat",
                                                             decay_times_lr=False), schedule=DECAY),
                                 4, False, "hand-written decay w -= wd*w"),
    "adamw_hat_not_times_lr": (_mlp("adamw_hat_wd", AdamW(f32(0.01), weight_decay=f32(0.01), decay_times_lr=False),
                                    schedule=DECAY),
                               4, False, "hand-written, spec convention (eps_hat); AdamW decay w -= 0.01*w"),
    "adam_v_hat_schedule": (_mlp("adam_v_hat_sched", Adam(f32(0.01), convention="eps_v_hat"), schedule=DECAY), 4,
                            False, "built-in optax.adam"),
    "adam_hat_schedule_scan": (_mlp("adam_hat_sched", Adam(f32(0.01)), schedule=DECAY), 4, True,
                               "hand-written, spec convention (eps_hat)"),
}


@pytest.mark.parametrize("name", list(VOCAB))
def test_f64_vocabulary_matches_oracle(name, request):
    jb = _x64(request)
    if jb is None:
        return
    spec, b, fast, implementation = VOCAB[name]
    m, _, grads = _lockstep(jb, spec, b, fast, steps=4)
    assert m.info["optimizer"].startswith(implementation), m.info["optimizer"]
    if spec.clip is not None:  # the clip bites at the first step
        norms = [float(np.sqrt(np.sum(g * g))) for g in grads]
        worst = float(np.sqrt(sum(n * n for n in norms))) if spec.clip.scope == "global" else max(norms)
        assert worst > 1.5 * spec.clip.max_norm
        assert m.info["clip"].startswith("built-in optax.clip_by_global_norm" if spec.clip.scope == "global"
                                         else "hand-written per tensor")
    if spec.schedule is not None:
        assert spec.lr_at(3) != spec.lr_at(0)


def test_f64_native_lr_schedule_rounds_to_float32(request):
    """In a float64 run optax.exponential_decay still computes in float32 (its count is int32): the native learning
    rate is float32-rounded (0.1 -> 0.10000000149), the aligned one the spec's double.  The bias of a saturated
    softmax (gradient exactly (1, -1) every step) moves by -lr_t: its trajectory shows each lr_t bit for bit."""
    jb = _x64(request)
    if jb is None:
        return
    import jax.numpy as jnp
    import optax

    spec = _spec("lr_schedule_f64", (1,), (Dense(2),), Loss("softmax_crossentropy", "mean"), SGD(0.1),
                 schedule=StepDecay(2, f32(0.5))).with_overrides(init=Init(explicit=((1e4, -1e4), (0.0, 0.0))))
    schedule = optax.exponential_decay(0.1, 2, f32(0.5), staircase=True)
    x, y = np.ones((1, 1)), np.ones(1, np.int64)
    for extra, lrs in (({}, [spec.lr_at(t) for t in range(4)]),
                       ({"native_only": ["lr_schedule"]}, [float(schedule(jnp.asarray(t, jnp.int32)))
                                                          for t in range(4)])):
        m = jb.Model(spec, init_weights(spec, 0), BuildOptions(dtype="float64", mode="native" if extra else "aligned",
                                                               extra=extra))
        b = 0.0
        for lr in lrs:
            assert np.array_equal(m.gradients(x, y)[1][1], [1.0, -1.0])
            m.train_step(x, y)
            b -= lr
            assert float(m.get_weights()[1][0]) == b
    assert lrs[0] == float(np.float32(0.1)) != 0.1
    assert m.info["native_settings"]["lr_schedule"] == "optax.exponential_decay(0.1, 2, 0.5, staircase=True)"


def test_f64_gradients_change_nothing(request):
    jb = _x64(request)
    if jb is None:
        return
    spec = CONV
    w = init_weights(spec, 2)
    m = jb.Model(spec, w, BuildOptions(dtype="float64", seed=3))
    x, y = _batch(spec, 4, np.random.default_rng(0))
    m.train_step(x, y)
    weights, state, opt = m.get_weights(), m.get_state(), [np.array(a) for a in jb.jax.tree_util.tree_leaves(
        m.opt_state)]
    first = m.gradients(x, y)
    second = m.gradients(x, y)
    assert first[0] == second[0] and all(np.array_equal(a, c) for a, c in zip(first[1], second[1]))
    assert all(np.array_equal(a, c) for a, c in zip(weights, m.get_weights()))
    assert all(np.array_equal(a, c) for a, c in zip(state, m.get_state()))
    assert all(np.array_equal(a, np.array(c)) for a, c in zip(opt, jb.jax.tree_util.tree_leaves(m.opt_state)))
    assert m.t == 1


def test_f64_shared_executable_follows_each_models_seed(request):
    """A second model of the same (spec, mode, dtype, device) runs the first one's compiled step: the masks and the
    state are arguments, so its own seed's masks are used (it matches its own oracle, not the first model)."""
    jb = _x64(request)
    if jb is None:
        return
    spec = CONV
    w = init_weights(spec, 4)
    x, y = _batch(spec, 4, np.random.default_rng(1))
    first = jb.Model(spec, w, BuildOptions(dtype="float64", seed=21))
    first.train_step(x, y)
    second = jb.Model(spec, w, BuildOptions(dtype="float64", seed=22))
    loss = second.train_step(x, y)
    assert second.info["compile_reused"].get("step") == 1
    o = ref.Model(spec, w, BuildOptions(dtype="float64", seed=22))
    assert abs(loss - o.train_step(x, y)) <= 1e-12 * abs(loss)
    for a, c in zip(second.get_weights(), o.get_weights()):
        assert scaled_error(a, c) < 1e-12
    assert not all(np.array_equal(a, c) for a, c in zip(first.get_weights(), second.get_weights()))


def test_f64_native_batchnorm_statistics_follow_the_spec(request):
    """Pure JAX has no BatchNorm, so native mode runs the spec's: after one step moving_mean = (1-m)*mean(h) and
    moving_variance = m*1 + (1-m)*var(h)*n/(n-1), h = x @ W + b the BatchNorm's input (here m = 0.9, unbiased)."""
    jb = _x64(request)
    if jb is None:
        return
    spec = DENSE
    bn = spec.layers[1]
    w = init_weights(spec, 0)
    x, y = _batch(spec, 6, np.random.default_rng(2))
    m = jb.Model(spec, w, BuildOptions(dtype="float64", mode="native"))
    m.train_step(x, y)
    h = x @ w[0] + w[1]
    mean, var = h.mean(axis=0), h.var(axis=0, ddof=1)
    mom = bn.momentum
    want = [(1 - mom) * mean, mom * 1.0 + (1 - mom) * var]
    for got, exp in zip(m.get_state(), want, strict=True):
        assert scaled_error(got, exp) < 1e-12
    assert "native = spec" in m.info["batchnorm"]
    assert not any("BatchNorm" in d for d in m.info["native_differences"])


# ----------------------------------------------------------------------------------------- float32, in process
@dataclass(frozen=True)
class Dummy(Layer):
    prefix = "dummy"

    def output_shape(self, in_shape):
        return tuple(in_shape)


@dataclass(frozen=True)
class Momentum:
    lr: float = 0.1


def test_tables_cover_the_vocabulary():
    jb = _jax()
    assert set(jb.LAYER_BUILDERS) == set(LAYERS.values())
    assert set(jb.OPTIMIZER_BUILDERS) == set(OPTIMIZERS.values())
    assert all(callable(v) for v in (*jb.LAYER_BUILDERS.values(), *jb.OPTIMIZER_BUILDERS.values()))


@pytest.mark.parametrize("mode", ["aligned", "native"])
def test_an_unknown_layer_or_optimizer_is_unsupported(mode):
    jb = _jax()
    spec = DENSE.with_overrides(layers=DENSE.layers[:2] + (Dummy(),) + DENSE.layers[2:])
    with pytest.raises(Unsupported, match="jax has no Dummy"):
        jb.Model(spec, init_weights(spec, 0), BuildOptions(dtype="float32", mode=mode))
    spec = DENSE.with_overrides(optimizer=Momentum())
    with pytest.raises(Unsupported, match="jax has no Momentum"):
        jb.Model(spec, init_weights(spec, 0), BuildOptions(dtype="float32", mode=mode))


def _dropout_probe(rate: float, n: int) -> ModelSpec:
    """x -> Dropout -> Dense(1): with a zero kernel and bias the output is 0, and with y = -0.5 the SSE loss's
    kernel gradient is 2*(0 + 0.5)*dropped(x) = dropped(x) itself (batch 1)."""
    return _spec("dropout_probe", (n,), (Dropout(rate), Dense(1)), Loss("sse", "sum"), SGD(0.1))


def test_native_dropout_uses_jax_rng():
    jb = _jax()
    rate, n = 0.3, 4000
    spec = _dropout_probe(rate, n)
    zeros = [np.zeros((n, 1)), np.zeros(1)]
    x = np.random.default_rng(0).uniform(0.5, 2.0, (1, n)).astype(np.float32)
    y = np.full((1, 1), -0.5, np.float32)
    m = jb.Model(spec, zeros, BuildOptions(dtype="float32", mode="native", seed=1))
    assert "Dropout masks from JAX's RNG (jax.random.bernoulli): trajectories not comparable" in \
        m.info["native_differences"]
    assert list(m.info["native_settings"]) == ["dropout_rng"]
    assert m.info["native_settings"]["dropout_rng"].startswith("jax.random.bernoulli(")
    only = jb.Model(spec, zeros, BuildOptions(dtype="float32", mode="native", seed=1,
                                              extra={"native_only": ["dropout_rng"]}))
    assert np.array_equal(only.gradients(x, y)[1][0], m.gradients(x, y)[1][0])  # the key alone: the same draw
    dropped = m.gradients(x, y)[1][0][:, 0]
    kept = dropped != 0
    np.testing.assert_allclose(dropped[kept], x[0, kept] / np.float32(1 - rate), rtol=1e-6)
    assert abs(kept.mean() - (1 - rate)) < 0.05
    assert np.array_equal(m.gradients(x, y)[1][0][:, 0], dropped)  # one step, one draw
    m.train_step(x, y)  # lr 0.1 moves the kernel; the next step's draw differs
    again = jb.Model(spec, zeros, BuildOptions(dtype="float32", mode="native", seed=1))
    again.t = 1
    assert not np.array_equal(again.gradients(x, y)[1][0][:, 0] != 0, kept)
    other_seed = jb.Model(spec, zeros, BuildOptions(dtype="float32", mode="native", seed=2))
    assert not np.array_equal(other_seed.gradients(x, y)[1][0][:, 0] != 0, kept)
    # inference mode: no dropout, the same numbers every time
    ones = [np.ones((n, 1)), np.zeros(1)]
    p = jb.Model(spec, ones, BuildOptions(dtype="float32", mode="native", seed=1))
    out = p.predict(x)
    assert np.array_equal(out, p.predict(x))
    np.testing.assert_allclose(out[0, 0], x.astype(np.float64).sum(), rtol=1e-5)


def test_aligned_dropout_uses_the_harness_masks():
    """The same probe in aligned mode: dropped(x) is x times the harness's mask of the step, in the loop and in the
    scan (stacked masks)."""
    jb = _jax()
    rate, n = 0.4, 50
    spec = _dropout_probe(rate, n)
    zeros = [np.zeros((n, 1)), np.zeros(1)]
    x = np.random.default_rng(0).uniform(0.5, 2.0, (1, n)).astype(np.float32)
    y = np.full((1, 1), -0.5, np.float32)
    for step in (0, 1, 5):  # gradients() and the train step at step t (t updates applied) use step t's masks
        m = jb.Model(spec, zeros, BuildOptions(dtype="float32", seed=9))
        assert "native_differences" not in m.info
        m.t = step
        want = (x * m.dropout_masks(step, 1)[0])[0]
        assert 0 < np.count_nonzero(want) < n
        assert np.array_equal(m.gradients(x, y)[1][0][:, 0], want)
        m.train_step(x, y)  # from a zero kernel: kernel = -0.1 * dropped(x)
        assert np.array_equal(m.get_weights()[0][:, 0], -np.float32(0.1) * want)
    # the scan fast mode (masks stacked (k, 1, n)) against the loop
    loop = jb.Model(spec, zeros, BuildOptions(dtype="float32", seed=9))
    scan = jb.Model(spec, zeros, BuildOptions(dtype="float32", seed=9, fast=True))
    xs, ys = np.stack([x] * 3), np.stack([y] * 3)
    np.testing.assert_array_equal(scan.train_steps(xs, ys), loop.train_steps(xs, ys))
    np.testing.assert_array_equal(scan.get_weights()[0], loop.get_weights()[0])
    assert scan.t == loop.t == 3
