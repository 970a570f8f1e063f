"""The NumPy scratch backend is the oracle: its gradients are checked against central finite differences in float64
for every layer, activation and loss, and its forward pass against the tutorials' fixed-weight examples."""

import itertools

import numpy as np
import pytest

from backends.base import BuildOptions
from backends.numpy_scratch import Model
from models import SGD, Adam, Conv2D, Dense, Flatten, Init, Loss, MaxPool2D, ModelSpec, f32


def make_spec(input_shape, layers, loss, optimizer=None):
    return ModelSpec("t", "test", input_shape, tuple(layers), loss, optimizer or SGD(0.1), Init(), "toy_431", (1, 2),
                     1, 0)


def scaled(a, b):
    return np.max(np.abs(a - b)) / max(np.max(np.abs(a)), np.max(np.abs(b)))


def finite_difference_check(spec, seed=0, n=4, h=1e-6):
    rng = np.random.default_rng(seed)
    weights = [rng.normal(0, 0.5, s) for s in spec.param_shapes()]  # non-zero biases: no ReLU exactly at a kink
    x = rng.normal(size=(n,) + spec.input_shape)
    k = spec.n_outputs
    y = rng.integers(0, k, n) if spec.loss.integer_labels else rng.uniform(size=(n, k))
    loss_of = lambda ws: Model(spec, ws, BuildOptions()).gradients(x, y)[0]
    _, grads = Model(spec, weights, BuildOptions()).gradients(x, y)
    worst = 0.0
    for j, w in enumerate(weights):
        fd = np.zeros_like(w)
        for idx in itertools.product(*map(range, w.shape)):
            wp = [a.copy() for a in weights]
            wm = [a.copy() for a in weights]
            wp[j][idx] += h
            wm[j][idx] -= h
            fd[idx] = (loss_of(wp) - loss_of(wm)) / (2 * h)
        worst = max(worst, scaled(fd, grads[j]))
    return worst


LOSSES = [Loss("sse", "sum"), Loss("sse", "mean"), Loss("binary_crossentropy", "mean"),
          Loss("binary_crossentropy", "sum"), Loss("softmax_crossentropy", "mean"), Loss("softmax_crossentropy", "sum")]


@pytest.mark.parametrize("activation", ["linear", "sigmoid", "relu"])
@pytest.mark.parametrize("loss", LOSSES, ids=lambda loss: f"{loss.kind}-{loss.reduction}")
def test_dense_gradients_match_finite_differences(activation, loss):
    out_act = "sigmoid" if loss.kind == "sse" else "linear"
    spec = make_spec((3,), [Dense(4, activation), Dense(3, out_act)], loss)
    assert finite_difference_check(spec) < 1e-6


@pytest.mark.parametrize("activation", ["linear", "relu", "sigmoid"])
def test_conv_pool_flatten_gradients_match_finite_differences(activation):
    # 7x7 input: conv -> 5x5, pool 2 -> 2x2 with the odd row/column cropped
    spec = make_spec((7, 7, 2), [Conv2D(3, (3, 3), activation), MaxPool2D(2), Flatten(), Dense(3)],
                     Loss("softmax_crossentropy", "mean"))
    assert finite_difference_check(spec) < 1e-6


def test_two_conv_layers_like_the_cnn():
    spec = make_spec((10, 10, 1), [Conv2D(2, (3, 3), "relu"), MaxPool2D(2), Conv2D(3, (2, 2), "relu"), Flatten(),
                                   Dense(2, "relu"), Dense(2)], Loss("softmax_crossentropy", "mean"))
    assert finite_difference_check(spec, n=3) < 1e-6


def golden(hidden_act, hidden_kernel, out_kernel):
    spec = make_spec((2,), [Dense(2, hidden_act), Dense(1)], Loss("sse", "sum"))
    w = [np.array(hidden_kernel, float), np.zeros(2), np.array(out_kernel, float), np.zeros(1)]
    return Model(spec, w, BuildOptions())


def test_tutorial_fixed_weight_forward_passes():
    # hidden units' weights [1, 1] and [-1, 1] (columns of the (in, out) kernel), output weights [2, -1]
    m = golden("linear", [[1, -1], [1, 1]], [[2], [-1]])
    assert m.predict(np.array([[2.0, 3.0], [3.0, 4.0]])).ravel().tolist() == [9.0, 13.0]
    # relu hidden units with weights [2, 4] and [4, -5], output weights [2, 7]
    m = golden("relu", [[2, 4], [4, -5]], [[2], [7]])
    assert m.predict(np.array([[3.0, 4.0]])).ravel().tolist() == [44.0]


def test_maxpool_routes_the_gradient_to_the_first_maximum_only():
    spec = make_spec((2, 2, 1), [MaxPool2D(2), Flatten(), Dense(1)], Loss("sse", "sum"))
    m = Model(spec, [np.ones((1, 1)), np.zeros(1)], BuildOptions())
    from backends.numpy_scratch import backward, forward
    x = np.ones((1, 2, 2, 1))  # a four-way tie
    out, caches = forward(np, spec, m.params, x, keep=True)
    # gradient w.r.t. the pool input: recompute through the pool cache
    from backends.numpy_scratch import _pool_backward
    dx = _pool_backward(np, x.shape, 2, caches[0][1], np.ones((1, 1, 1, 1)))
    assert dx.ravel().tolist() == [1.0, 0.0, 0.0, 0.0]
    assert len(backward(np, spec, m.params, caches, np.ones((1, 1)))) == 2


def _adam_reference(w, grads, opt):
    """The two conventions written out from their definitions, one step at a time."""
    m = np.zeros_like(w)
    v = np.zeros_like(w)
    for t, g in enumerate(grads, 1):
        m = opt.beta1 * m + (1 - opt.beta1) * g
        v = opt.beta2 * v + (1 - opt.beta2) * g * g
        if opt.convention == "eps_hat":
            w = w - opt.lr * np.sqrt(1 - opt.beta2**t) / (1 - opt.beta1**t) * m / (np.sqrt(v) + opt.epsilon)
        else:
            w = w - opt.lr * (m / (1 - opt.beta1**t)) / (np.sqrt(v / (1 - opt.beta2**t)) + opt.epsilon)
    return w


@pytest.mark.parametrize("convention", ["eps_hat", "eps_v_hat"])
def test_adam_follows_its_convention(convention):
    opt = Adam(lr=f32(0.01), epsilon=f32(1e-3), convention=convention)  # a large eps makes conventions differ a lot
    spec = make_spec((2,), [Dense(1)], Loss("sse", "sum"), opt)
    x, y = np.array([[1.0, 2.0]]), np.array([[0.5]])
    w0 = [np.array([[0.3], [-0.2]]), np.array([0.1])]
    m = Model(spec, w0, BuildOptions())
    grads = []
    for _ in range(5):
        grads.append(m.gradients(x, y)[1][0])
        m.train_step(x, y)
    expected = _adam_reference(w0[0], grads, opt)
    assert np.allclose(m.get_weights()[0], expected, rtol=1e-13, atol=0)
    other = "eps_v_hat" if convention == "eps_hat" else "eps_hat"
    import dataclasses
    assert not np.allclose(_adam_reference(w0[0], grads, dataclasses.replace(opt, convention=other)), expected,
                           rtol=1e-6, atol=0)


def test_gradients_do_not_update_and_float32_stays_float32():
    spec = make_spec((3,), [Dense(2, "relu"), Dense(1)], Loss("binary_crossentropy", "mean"), Adam())
    w = [np.full(s, 0.1) for s in spec.param_shapes()]
    m = Model(spec, w, BuildOptions(dtype="float32"))
    x, y = np.ones((2, 3), np.float32), np.ones((2, 1), np.float32)
    m.gradients(x, y)
    assert all(np.array_equal(a, b.astype(np.float32)) for a, b in zip(m.get_weights(), w))
    m.train_step(x, y)
    assert all(a.dtype == np.float32 for a in m.get_weights())
    assert not np.array_equal(m.get_weights()[0], w[0])
    assert np.array_equal(w[0], np.full((3, 2), 0.1))  # the caller's arrays are never aliased


def test_stable_losses_from_extreme_logits():
    spec = make_spec((1,), [Dense(2)], Loss("softmax_crossentropy", "mean"))
    m = Model(spec, [np.array([[1000.0, -1000.0]]), np.zeros(2)], BuildOptions())
    loss, g = m.gradients(np.array([[1.0]]), np.array([1]))
    assert np.isfinite(loss) and loss == pytest.approx(2000.0) and all(np.all(np.isfinite(a)) for a in g)
    spec = make_spec((1,), [Dense(1)], Loss("binary_crossentropy", "mean"))
    m = Model(spec, [np.array([[800.0]]), np.zeros(1)], BuildOptions())
    loss, _ = m.gradients(np.array([[1.0]]), np.array([[0.0]]))
    assert loss == pytest.approx(800.0)


def test_every_rounding_variant_computes_the_same_mathematics_in_another_rounding():
    """The envelope's variants (``ROUNDING_VARIANTS``) change the rounding, never the mathematics: in float64 each stays
    within 1e-11 of the plain oracle over a few Adam steps of a conv net, none is a no-op, the switch probe moves the
    numbers by more than one-ulp MCA, and an unknown name is refused."""
    from backends.numpy_scratch import ROUNDING_VARIANTS

    spec = make_spec((6, 6, 2), [Conv2D(3, (3, 3), "relu"), MaxPool2D(2), Flatten(), Dense(3)],
                     Loss("softmax_crossentropy", "mean"), Adam(lr=f32(1e-3), epsilon=f32(1e-7)))
    rng = np.random.default_rng(0)
    weights = [rng.normal(0, 0.5, s) for s in spec.param_shapes()]
    x, y = rng.normal(size=(4, 6, 6, 2)), rng.integers(0, 3, 4)

    def run(rounding):
        m = Model(spec, weights, BuildOptions(extra={"rounding": rounding}))
        losses = [m.train_step(x, y) for _ in range(3)]
        return np.array(losses), np.concatenate([w.ravel() for w in m.get_weights()]), m.gradients(x, y)[1]

    plain = run("")
    moved = {}
    for name in ROUNDING_VARIANTS:
        losses, w, grads = run(name)
        assert scaled(losses, plain[0]) < 1e-11 and scaled(w, plain[1]) < 1e-11, name
        assert all(scaled(g, p) < 1e-9 for g, p in zip(grads, plain[2])), name
        moved[name] = max(np.max(np.abs(w - plain[1])), *(np.max(np.abs(g - p)) for g, p in zip(grads, plain[2])))
        assert moved[name] > 0, f"{name} is a no-op here"
    assert moved["switch"] > 4 * moved["mca"]
    with pytest.raises(ValueError, match="unknown rounding variant"):
        Model(spec, weights, BuildOptions(extra={"rounding": "blocked+typo"}))


# ---------------------------------------------------------------------------------------- BatchNorm, Dropout, Activation
def bn_spec(layers, input_shape, optimizer=None):
    return ModelSpec("t", "test", input_shape, tuple(layers), Loss("softmax_crossentropy", "mean"),
                     optimizer or SGD(0.1), Init(), "toy_431", (2, 4), 1, 0)


@pytest.mark.parametrize("activation", ["sigmoid", "relu"])
def test_batchnorm_dropout_gradients_match_finite_differences(activation):
    from models import Activation, BatchNorm, Dropout

    # a dense BatchNorm (features) after a bias-free layer, dropout, an activation layer; and the conv form (channels)
    dense = bn_spec([Dense(4, use_bias=False), BatchNorm(), Activation(activation), Dropout(0.3), Dense(3)], (3,))
    assert finite_difference_check(dense) < 1e-6
    conv = bn_spec([Conv2D(2, (3, 3), use_bias=False), BatchNorm(unbiased_moving_variance=True),
                    Activation(activation), Flatten(), Dropout(0.5), Dense(3)], (5, 5, 2))
    assert finite_difference_check(conv, n=3) < 1e-6


def test_batchnorm_state_moves_in_training_only_by_the_spec_formula():
    from models import Activation, BatchNorm

    for unbiased in (False, True):
        spec = bn_spec([Dense(3, use_bias=False), BatchNorm(momentum=f32(0.9), unbiased_moving_variance=unbiased),
                        Activation("relu"), Dense(2)], (4,))
        rng = np.random.default_rng(0)
        w = [rng.normal(0, 0.5, s) for s in spec.param_shapes()]
        m = Model(spec, w, BuildOptions())
        x, y = rng.normal(size=(5, 4)), rng.integers(0, 2, 5)
        m.gradients(x, y)
        m.predict(x)
        assert [s.tolist() for s in m.get_state()] == [[0.0] * 3, [1.0] * 3]  # neither moves the state
        m.train_step(x, y)
        h = x @ w[0]
        var = h.var(axis=0, ddof=1 if unbiased else 0)
        mean_state, var_state = m.get_state()
        mom = f32(0.9)  # 0.8999999761581421: the spec's values are float32-exact
        assert np.allclose(mean_state, (1 - mom) * h.mean(axis=0), rtol=1e-14, atol=0)
        assert np.allclose(var_state, mom + (1 - mom) * var, rtol=1e-14, atol=0)
        # inference mode normalises with the moving statistics (and the weights after the step)
        k0, g, b, k1, b1 = m.get_weights()
        z = (x @ k0 - mean_state) / np.sqrt(var_state + f32(1e-3)) * g + b
        logits = np.maximum(z, 0) @ k1 + b1
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        assert np.allclose(m.predict(x), p / p.sum(axis=1, keepdims=True), rtol=1e-12, atol=0)


def test_dropout_masks_are_the_harness_masks_of_the_step_and_off_at_inference():
    from models import Dropout, dropout_masks

    spec = bn_spec([Dense(6), Dropout(0.5), Dense(2)], (3,))
    rng = np.random.default_rng(1)
    w = [rng.normal(0, 0.5, s) for s in spec.param_shapes()]
    x, y = rng.normal(size=(4, 3)), rng.integers(0, 2, 4)
    m = Model(spec, w, BuildOptions(seed=7))
    _, g0 = m.gradients(x, y)
    mask = dropout_masks(spec, 7, 0, 4)[1]
    assert set(np.unique(mask)) == {0.0, 2.0}
    # the second kernel's gradient sees only the kept hidden units
    h = x @ w[0] + w[1]
    assert np.allclose(g0[2][np.where(~mask.any(axis=0))[0]], 0.0)
    assert np.array_equal(dropout_masks(spec, 7, 0, 4)[1], mask)
    assert not np.array_equal(dropout_masks(spec, 7, 1, 4)[1], mask)  # the next step draws new masks
    assert not np.array_equal(dropout_masks(spec, 8, 0, 4)[1], mask)  # another seed, other masks
    z = h @ w[2] + w[3]
    p = np.exp(z - z.max(axis=1, keepdims=True))
    assert np.allclose(m.predict(x), p / p.sum(axis=1, keepdims=True), rtol=1e-13, atol=0)  # inference: identity


def test_an_unknown_layer_or_optimizer_is_refused_by_name():
    from dataclasses import dataclass

    from backends.base import Unsupported
    from models import Layer

    @dataclass(frozen=True)
    class Dummy(Layer):
        def output_shape(self, in_shape):
            return tuple(in_shape)

    spec = bn_spec([Dense(3), Dummy(), Dense(2)], (3,))
    with pytest.raises(Unsupported, match="numpy has no Dummy"):
        Model(spec, [np.zeros(s) for s in spec.param_shapes()], BuildOptions())

    @dataclass(frozen=True)
    class Lion:
        lr: float = 1e-4

    spec = bn_spec([Dense(2)], (3,), optimizer=Lion())
    with pytest.raises(Unsupported, match="numpy has no Lion"):
        Model(spec, [np.zeros(s) for s in spec.param_shapes()], BuildOptions())
