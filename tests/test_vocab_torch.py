"""The torch backend on the whole spec vocabulary: BatchNorm, Dropout, Activation, use_bias=False, in-process.

* Aligned float64 against the NumPy oracle (same weights, same ``BuildOptions(seed=...)``, so the same dropout masks):
  loss, gradients, weights and BatchNorm state after every step, the fused ``train_steps``, and predict, to 1e-12;
  ``gradients()`` changes nothing (weights, optimizer state, BatchNorm state).
* The layout edge: canonical -> torch -> canonical is exact for parameters and state; BatchNorm vectors and dropout
  masks after a Flatten are permuted to torch's (c, h, w) order.
* Dispatch by table: an unknown layer or optimizer type raises Unsupported naming it, before any work.
* Native mode: torch's BatchNorm defaults measured (running_var = 0.9*1 + 0.1*unbiased batch variance, running_mean =
  0.1*batch mean) and listed in ``native_differences``; native dropout keeps {0, x/(1-p)} at about 1-p, predict is
  deterministic.
* CUDA-graph fast mode (CUDA only) equals the eager steps with BatchNorm state and dropout masks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import backends.numpy_scratch as ref  # noqa: E402
import backends.torch_eager as tb  # noqa: E402
from backends.base import BuildOptions, Unsupported  # noqa: E402
from models import get_model, init_weights  # noqa: E402
from models.spec import (  # noqa: E402
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
    init_state,
)
from tests.lockstep import scaled_error  # noqa: E402

TOL = 1e-12
SEED = 5  # the run's seed: the dropout masks




def _spec(name, input_shape, layers, loss, optimizer, batch_sizes=(1, 4)) -> ModelSpec:
    probe = ModelSpec(name=name, description=name, input_shape=input_shape, layers=layers, loss=loss,
                      optimizer=optimizer, init=Init("glorot_uniform", "uniform", 0.1), dataset="toy_431",
                      batch_sizes=batch_sizes, epochs=1, expected_params=0)
    return probe.with_overrides(expected_params=probe.param_count())


# Conv2D(use_bias=False) -> BatchNorm -> relu -> pool -> Flatten -> Dropout -> Dense (the brief's conv spec); momentum
# 0.8 so that the state moves visibly in a few steps
CONV = _spec("conv_bn_drop", (6, 7, 2),
             (Conv2D(3, (3, 3), use_bias=False), BatchNorm(momentum=f32(0.8)), Activation("relu"), MaxPool2D(2),
              Flatten(), Dropout(0.4), Dense(3)),
             Loss("softmax_crossentropy", "mean"), Adam(lr=f32(0.01)))
# Dense -> BatchNorm(unbiased) -> Activation (the brief's dense spec; a flat BatchNorm needs batches of 2 or more)
DENSE = _spec("dense_bn_unbiased", (5,),
              (Dense(4, use_bias=False), BatchNorm(momentum=f32(0.9), unbiased_moving_variance=True),
               Activation("sigmoid"), Dense(2)),
              Loss("sse", "sum"), SGD(0.1), batch_sizes=(2, 4))
# BatchNorm and Dropout on the flat features of a Flatten: gamma/beta/moving statistics and masks in (c, h, w) order
FLAT = _spec("flat_bn_drop", (4, 5, 3),
             (Conv2D(2, (2, 2), activation="relu"), Flatten(), BatchNorm(momentum=f32(0.5)), Dropout(0.25),
              Activation("relu"), Dense(2, use_bias=False)),
             Loss("binary_crossentropy", "mean"), Adam(lr=f32(0.01), convention="eps_v_hat"), batch_sizes=(2, 4))
SPECS = {s.name: s for s in (CONV, DENSE, FLAT)}
CASES = [("conv_bn_drop", 1), ("conv_bn_drop", 4), ("dense_bn_unbiased", 4), ("flat_bn_drop", 2),
         ("flat_bn_drop", 4)]


def _batches(spec: ModelSpec, k: int, b: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    xs = rng.normal(size=(k, b) + tuple(spec.input_shape))
    if spec.loss.integer_labels:
        ys = rng.integers(0, spec.n_outputs, (k, b))
    else:
        ys = (rng.random((k, b, spec.n_outputs)) > 0.5).astype(np.float64)
    return xs, ys


def _pair(spec, dtype="float64", **kw):
    w = init_weights(spec, 1)
    opts = dict(dtype=dtype, seed=SEED, **kw)
    return w, tb.Model(spec, w, BuildOptions(**opts)), ref.Model(spec, w, BuildOptions(dtype="float64", seed=SEED))


def _assert_close(got, want, what, tol=TOL):
    assert len(got) == len(want), what
    for i, (a, b) in enumerate(zip(got, want)):
        assert np.shape(a) == np.shape(b), (what, i)
        assert scaled_error(a, b) <= tol, (what, i, scaled_error(a, b))


# ------------------------------------------------------------------------------------------- aligned vs the oracle
@pytest.mark.parametrize("name,batch", CASES, ids=[f"{n}-b{b}" for n, b in CASES])
def test_aligned_float64_matches_oracle_and_gradients_change_nothing(name, batch):
    spec = SPECS[name]
    w, m, o = _pair(spec)
    xs, ys = _batches(spec, 4, batch)
    state0 = init_state(spec)
    _assert_close(m.get_state(), state0, "initial state", tol=0)
    for x, y in zip(xs, ys):
        w_before, s_before = m.get_weights(), m.get_state()
        loss, grads = m.gradients(x, y)
        loss_ref, grads_ref = o.gradients(x, y)
        assert abs(loss - loss_ref) <= TOL * abs(loss_ref)
        _assert_close(grads, grads_ref, "gradients")
        # gradients() changed nothing: weights and BatchNorm state are bit-identical
        assert all(np.array_equal(a, b) for a, b in zip(m.get_weights(), w_before))
        assert all(np.array_equal(a, b) for a, b in zip(m.get_state(), s_before))
        # ... and optimizer state: the update that follows equals the oracle's
        assert abs(m.train_step(x, y) - o.train_step(x, y)) <= TOL * abs(loss_ref)
        _assert_close(m.get_weights(), o.get_weights(), "weights")
        _assert_close(m.get_state(), o.get_state(), "state")
        # the moves of the state themselves (not hidden by the initial ones)
        _assert_close([a - b for a, b in zip(m.get_state(), state0)], [a - b for a, b in zip(o.get_state(), state0)],
                      "state moves")
    assert any(not np.array_equal(a, b) for a, b in zip(m.get_state(), state0))  # the state moved
    x = _batches(spec, 1, 5, seed=9)[0][0]
    _assert_close([m.predict(x)], [o.predict(x)], "predict")  # inference mode: moving statistics, no dropout


@pytest.mark.parametrize("name", ["conv_bn_drop", "flat_bn_drop"])
def test_fused_train_steps_use_the_masks_of_steps_t_to_t_plus_k(name):
    spec = SPECS[name]
    _, m, o = _pair(spec)
    xs, ys = _batches(spec, 5, 3, seed=2)
    want = [o.train_step(x, y) for x, y in zip(xs, ys)]
    got = np.concatenate([m.train_steps(xs[:2], ys[:2]), m.train_steps(*m.to_device(xs[2:], ys[2:]))])
    assert scaled_error(got, want) < TOL
    _assert_close(m.get_weights(), o.get_weights(), "weights")
    _assert_close(m.get_state(), o.get_state(), "state")


def test_aligned_dropout_masks_are_the_harness_masks():
    """A dropout of rate 0.4 at step 0 and 1 drops exactly where the harness's masks are 0 (not torch's RNG)."""
    spec = _spec("drop_only", (3, 4, 2), (Dropout(0.4), Flatten(), Dense(1, use_bias=False)), Loss("sse", "sum"),
                 SGD(0.0))
    w = [np.ones((24, 1))]
    m = tb.Model(spec, w, BuildOptions(dtype="float64", seed=SEED))
    x = np.random.default_rng(0).normal(size=(2, 3, 4, 2))
    for step in range(2):
        mask = m.dropout_masks(step, 2)[0]
        _, g = m.gradients(x, np.zeros((2, 1)))
        out = (x * mask).reshape(2, -1).sum(-1)
        np.testing.assert_allclose(g[0][:, 0], 2 * ((x * mask).reshape(2, -1) * out[:, None]).sum(0), rtol=1e-13)
        m.train_step(x, np.zeros((2, 1)))
    assert not np.array_equal(m.dropout_masks(0, 2)[0], m.dropout_masks(1, 2)[0])


def test_aligned_float32_is_close_to_the_oracle():
    spec = CONV
    _, m, o = _pair(spec, dtype="float32")
    xs, ys = _batches(spec, 3, 4, seed=3)
    assert scaled_error(m.train_steps(xs, ys), o.train_steps(xs, ys)) < 1e-5
    assert all(a.dtype == np.float32 for a in m.get_state())
    _assert_close(m.get_weights(), o.get_weights(), "weights", tol=1e-5)
    _assert_close(m.get_state(), o.get_state(), "state", tol=1e-5)


def test_mnist_bn_cnn_one_step_matches_oracle():
    spec = get_model("mnist_bn_cnn")
    _, m, o = _pair(spec)
    rng = np.random.default_rng(4)
    x, y = rng.random((2, 28, 28, 1)), rng.integers(0, 10, 2)
    loss, grads = m.gradients(x, y)
    loss_ref, grads_ref = o.gradients(x, y)
    assert abs(loss - loss_ref) <= TOL * abs(loss_ref)
    _assert_close(grads, grads_ref, "gradients")
    m.train_step(x, y)
    o.train_step(x, y)
    _assert_close(m.get_weights(), o.get_weights(), "weights")
    _assert_close(m.get_state(), o.get_state(), "state")
    _assert_close([m.predict(x)], [o.predict(x)], "predict")
    assert m.info["batchnorm"].startswith("torch.batch_norm") and m.info["dropout"].startswith("the harness")


# ---------------------------------------------------------------------------------------------- the layout edge
@pytest.mark.parametrize("name", ["conv_bn_drop", "dense_bn_unbiased", "flat_bn_drop", "mnist_bn_cnn"])
def test_layout_round_trip_of_parameters_and_state_is_exact(name):
    spec = SPECS.get(name) or get_model(name)
    rng = np.random.default_rng(0)
    w = init_weights(spec, 3)
    s = [rng.random(shape) for shape in spec.state_shapes()]
    for plan, arrays in ((tb.layout_plan(spec), w), (tb.state_plan(spec), s)):
        back = tb.from_torch_layout(plan, tb.to_torch_layout(plan, arrays))
        assert all(np.array_equal(a, b) for a, b in zip(arrays, back, strict=True))
    m = tb.Model(spec, w, BuildOptions(dtype="float64"))
    assert all(np.array_equal(a, b) for a, b in zip(w, m.get_weights(), strict=True))


def test_layout_plans_follow_roles_and_the_flatten_order():
    plan = tb.layout_plan(FLAT)
    assert [p.kind for p in plan] == ["conv", "bias", "vector", "vector", "dense"]  # Dense(use_bias=False)
    rows = tb.flatten_rows(3, 4, 2)
    assert plan[2].rows == plan[3].rows == plan[4].rows == tuple(rows)  # gamma, beta, kernel rows after the Flatten
    assert [p.rows == tuple(rows) for p in tb.state_plan(FLAT)] == [True, True]
    assert tb.mask_plan(FLAT) == [tuple(rows)]
    bn_cnn = get_model("mnist_bn_cnn")
    assert [p.kind for p in tb.layout_plan(bn_cnn)] == ["conv", "vector", "vector", "conv", "vector", "vector",
                                                       "dense", "bias"]
    assert all(p.rows is None and p.torch == p.canonical for p in tb.state_plan(bn_cnn))  # (C,) in both layouts
    assert tb.mask_plan(bn_cnn) == [tuple(tb.flatten_rows(5, 5, 64))]  # the Dropout sits after the Flatten
    assert tb.mask_plan(CONV) == [tuple(tb.flatten_rows(2, 2, 3))]
    assert tb.mask_plan(_spec("d", (3, 3, 2), (Dropout(0.5), Flatten(), Dense(1)), Loss("sse", "sum"),
                              SGD(0.1))) == ["nchw"]
    mask = np.arange(2 * 24).reshape(2, 24)
    np.testing.assert_array_equal(tb.mask_to_torch(tuple(tb.flatten_rows(2, 4, 3)), mask),
                                  mask.reshape(2, 2, 4, 3).transpose(0, 3, 1, 2).reshape(2, 24))


# -------------------------------------------------------------------------------------------- dispatch by table
@dataclass(frozen=True)
class Dummy(Layer):
    prefix = "dummy"

    def output_shape(self, in_shape):
        return tuple(in_shape)


@dataclass(frozen=True)
class DummyOpt:
    lr: float = 0.1


def test_every_vocabulary_type_is_in_the_tables():
    from models.spec import LAYERS, OPTIMIZERS

    assert set(LAYERS.values()) <= set(tb.LAYER_BUILDERS)
    assert set(OPTIMIZERS.values()) <= set(tb.OPTIMIZER_BUILDERS)


@pytest.mark.parametrize("where", [0, 2])
def test_an_unknown_layer_is_unsupported_by_name(where):
    layers = list(DENSE.layers)
    layers.insert(where, Dummy())
    spec = DENSE.with_overrides(layers=tuple(layers))
    with pytest.raises(Unsupported, match="torch has no Dummy"):
        tb.Model(spec, init_weights(spec, 0), BuildOptions(dtype="float64"))
    with pytest.raises(Unsupported, match="torch has no Dummy"):
        tb.layout_plan(spec)


def test_an_unknown_optimizer_is_unsupported_by_name():
    spec = DENSE.with_overrides(optimizer=DummyOpt())
    with pytest.raises(Unsupported, match="torch has no DummyOpt"):
        tb.Model(spec, init_weights(spec, 0), BuildOptions(dtype="float64"))


# ------------------------------------------------------------------------------------------------- native mode
def test_native_batchnorm_follows_torch_defaults():
    """torch's nn.BatchNorm1d(): running_mean = 0.9*0 + 0.1*mean, running_var = 0.9*1 + 0.1*unbiased var (measured on
    the BatchNorm's input, x @ W of the first Dense), eps 1e-5 in the normalisation."""
    spec = DENSE
    w = init_weights(spec, 1)
    x, y = _batches(spec, 1, 6, seed=7)
    x, y = x[0], y[0]
    m = tb.Model(spec, w, BuildOptions(dtype="float64", mode="native"))
    m.gradients(x, y)
    assert all(np.array_equal(a, b) for a, b in zip(m.get_state(), init_state(spec)))  # gradients(): state restored
    m.train_step(x, y)
    h = x @ w[0]
    want_mean, want_var = 0.1 * h.mean(0), 0.9 + 0.1 * h.var(0, ddof=1)
    mean, var = m.get_state()
    assert scaled_error(mean, want_mean) < TOL and scaled_error(var, want_var) < TOL
    assert scaled_error(var, 0.9 + 0.1 * h.var(0)) > 1e-3  # the biased variance would be told apart
    diffs = m.info["native_differences"]
    # the spec's momentum is f32(0.9); torch's 1 - 0.1 is the double 0.9: equal in float32 only
    assert "BatchNorm momentum 0.9 (spec 0.8999999761581421) (torch's momentum=0.1 is the weight of the new value)" \
        in diffs
    assert any(d.startswith("BatchNorm epsilon 1e-05 (spec 0.001)") for d in diffs)
    assert not any("unbiased" in d for d in diffs)  # this spec stores the unbiased variance too
    # inference uses the running statistics with eps 1e-5 (at the weights after the step)
    k0, g, b, k1, b1 = m.get_weights()
    z = (x @ k0 - mean) / np.sqrt(var + 1e-5) * g + b
    want = 1 / (1 + np.exp(-z)) @ k1 + b1
    assert scaled_error(m.predict(x), want) < TOL


def test_native_differences_of_mnist_bn_cnn():
    spec = get_model("mnist_bn_cnn")
    m = tb.Model(spec, init_weights(spec, 0), BuildOptions(dtype="float32", mode="native"))
    diffs = m.info["native_differences"]
    text = "\n".join(diffs)
    assert "BatchNorm momentum 0.9 (spec 0.99)" in text
    assert "BatchNorm epsilon 1e-05 (spec 0.001)" in text
    assert "BatchNorm running variance: torch stores the unbiased batch variance (spec: biased)" in diffs
    assert "Dropout masks from torch's RNG: trajectories not comparable" in diffs
    assert len(diffs) == len(set(diffs))  # two BatchNorm layers, one line per difference


def test_native_dropout_keeps_scaled_values_and_predict_is_deterministic():
    p = 0.3
    spec = _spec("native_drop", (2000,), (Dropout(p), Dense(1)), Loss("sse", "sum"), SGD(0.0))
    w = init_weights(spec, 0)
    m = tb.Model(spec, w, BuildOptions(dtype="float64", mode="native", seed=3))
    seen = []
    m.net[0].register_forward_hook(lambda mod, inp, out: seen.append((inp[0].detach().clone(), out.detach().clone())))
    x = np.random.default_rng(0).uniform(1, 2, size=(2, 2000))
    m.train_step(x, np.zeros((2, 1)))
    m.train_step(x, np.zeros((2, 1)))
    (xin, out), (_, out2) = seen[0], seen[1]
    kept = out != 0
    assert torch.allclose(out[kept], xin[kept] / (1 - p), rtol=1e-15, atol=0)
    assert abs(kept.double().mean().item() - (1 - p)) < 0.03
    assert not torch.equal(out, out2)  # a new mask each step
    a, b = m.predict(x), m.predict(x)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(a, x @ w[0] + w[1], rtol=1e-13)  # no dropout at inference
    assert len(seen) == 4  # predict ran the module too, as the identity


# ------------------------------------------------------------------------------------------------- CUDA graphs
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA-graph fast mode needs a CUDA device")
@pytest.mark.parametrize("name", ["conv_bn_drop", "flat_bn_drop"])
def test_cuda_graph_fast_mode_with_state_and_dropout(name):
    spec = SPECS[name]
    w = init_weights(spec, 1)
    xs, ys = _batches(spec, 6, 4, seed=5)
    o = ref.Model(spec, w, BuildOptions(dtype="float64", seed=SEED))
    fast = tb.Model(spec, w, BuildOptions(dtype="float64", device="cuda", fast=True, seed=SEED))
    assert fast.fast_graph
    want = o.train_steps(xs, ys)
    got = np.concatenate([fast.train_steps(xs[:1], ys[:1]), fast.train_steps(*fast.to_device(xs[1:], ys[1:]))])
    assert scaled_error(got, want) < 1e-11
    _assert_close(fast.get_weights(), o.get_weights(), "weights", tol=1e-11)
    _assert_close(fast.get_state(), o.get_state(), "state", tol=1e-11)
    x = xs[0]
    loss, grads = fast.gradients(x, ys[0])
    loss_ref, grads_ref = o.gradients(x, ys[0])
    _assert_close(grads, grads_ref, "gradients after replays", tol=1e-11)
    _assert_close([fast.predict(x)], [o.predict(x)], "predict", tol=1e-11)
