"""The planted bugs of ``harness/mutants.py`` do what their descriptions say, measured against the oracle on small
models (issue 14: the diagnosis must name each one's cause, so each must be exactly the mistake it claims)."""

import dataclasses

import numpy as np
import pytest

from backends import numpy_scratch
from backends.base import BuildOptions, Unsupported
from harness import mutants
from models.spec import SGD, Adam, Conv2D, Dense, Flatten, Init, Loss, ModelSpec, f32, init_weights
from models.zoo import MODELS

NEW = ("loss_halved", "lr_typo", "adam_bias_step", "adam_betas_swapped", "conv_kernel_transposed", "flatten_chw",
       "softmax_axis", "state_reset", "activation_missing")
F64 = BuildOptions(dtype="float64")


def _spec(layers, input_shape):
    spec = ModelSpec(name="tiny", description="a test model", input_shape=input_shape, layers=tuple(layers),
                     loss=Loss("softmax_crossentropy", "mean"), optimizer=Adam(lr=f32(0.01)),
                     init=Init("glorot_uniform", "normal", 0.1), dataset="none",
                     batch_sizes=(1, 5), epochs=1, expected_params=0)
    return dataclasses.replace(spec, expected_params=spec.param_count())


TINY_CNN = _spec([Conv2D(3, (3, 3), "relu"), Flatten(), Dense(4)], (5, 5, 2))
TINY_MLP = _spec([Dense(6, "tanh"), Dense(3)], (4,))


def _batch(spec, n, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, *spec.input_shape))
    y = (rng.integers(0, spec.n_outputs, n) if spec.loss.integer_labels
         else rng.integers(0, 2, (n, spec.n_outputs)).astype(np.float64))
    return x, y


def _bug(monkeypatch, bug, spec, weights, options=F64):
    monkeypatch.setattr(mutants, "BUG", bug)
    return mutants.Model(spec, weights, options)


def test_every_bug_has_its_cause_and_the_old_bugs_are_kept():
    assert set(mutants.CAUSE) == set(mutants.BUGS)
    assert set(NEW) <= set(mutants.BUGS) and len(mutants.BUGS) == 14 + len(NEW)
    assert mutants.CAUSE["transposed_weight"] == mutants.CAUSE["conv_kernel_transposed"] == "kernel_layout"
    assert all(bug in mutants.BUGS for bug, _ in mutants.IDENTICAL_AT)


@pytest.mark.parametrize("model", ["mlp_431", "pima_mlp", "mnist_mlp"])
def test_loss_halved_halves_the_loss_and_every_gradient_exactly(monkeypatch, model):
    spec = MODELS[model]  # sse, binary cross-entropy, softmax cross-entropy
    w = init_weights(spec, 0)
    x, y = _batch(spec, 3)
    loss, grads = numpy_scratch.Model(spec, w, F64).gradients(x, y)
    half, hgrads = _bug(monkeypatch, "loss_halved", spec, w).gradients(x, y)
    assert half == loss / 2  # a factor of 2 is exact in binary floating point
    for g, h in zip(grads, hgrads):
        np.testing.assert_array_equal(h, g / 2)


def test_lr_typo_makes_the_first_sgd_update_a_tenth(monkeypatch):
    spec = MODELS["mlp_431"]
    w = init_weights(spec, 0)
    x, y = _batch(spec, 3)
    ref = numpy_scratch.Model(spec, w, F64)
    bug = _bug(monkeypatch, "lr_typo", spec, w)
    assert bug.spec.optimizer.lr == 0.01
    ref.train_step(x, y)
    bug.train_step(x, y)
    for w0, a, b in zip(w, ref.get_weights(), bug.get_weights()):
        np.testing.assert_allclose(b - w0, (a - w0) / 10, rtol=1e-12, atol=1e-300)
    adam = _bug(monkeypatch, "lr_typo", MODELS["pima_mlp"], init_weights(MODELS["pima_mlp"], 0))
    assert adam.spec.optimizer.lr == f32(1e-4)  # 1e-4 typed for 1e-3, representable in float32 like the spec's


def test_adam_bias_step_corrects_with_the_next_steps_betas(monkeypatch):
    spec = TINY_MLP
    w = init_weights(spec, 0)
    x, y = _batch(spec, 5)
    bug = _bug(monkeypatch, "adam_bias_step", spec, w)
    _, grads = bug.gradients(x, y)
    bug.train_step(x, y)
    opt = spec.optimizer
    b1, b2, lr, eps = opt.beta1, opt.beta2, opt.lr, opt.epsilon
    for w0, g, w1 in zip(w, grads, bug.get_weights()):  # t = 1, corrected as if t = 2 (eps_hat)
        m, v = (1 - b1) * g, (1 - b2) * g * g
        expected = w0 - lr * np.sqrt(1 - b2**2) / (1 - b1**2) * m / (np.sqrt(v) + eps)
        np.testing.assert_allclose(w1, expected, rtol=1e-12, atol=1e-15)
    # eps_v_hat: lr * (m / (1 - b1^2)) / (sqrt(v / (1 - b2^2)) + eps)
    spec = dataclasses.replace(spec, optimizer=dataclasses.replace(opt, convention="eps_v_hat"))
    bug = _bug(monkeypatch, "adam_bias_step", spec, w)
    bug.train_step(x, y)
    for w0, g, w1 in zip(w, grads, bug.get_weights()):
        m, v = (1 - b1) * g, (1 - b2) * g * g
        expected = w0 - lr * (m / (1 - b1**2)) / (np.sqrt(v / (1 - b2**2)) + eps)
        np.testing.assert_allclose(w1, expected, rtol=1e-12, atol=1e-15)


def test_adam_betas_swapped_is_the_oracle_with_the_betas_swapped(monkeypatch):
    spec = TINY_MLP
    w = init_weights(spec, 0)
    opt = spec.optimizer
    ref = numpy_scratch.Model(dataclasses.replace(spec, optimizer=dataclasses.replace(opt, beta1=opt.beta2,
                                                                                     beta2=opt.beta1)), w, F64)
    bug = _bug(monkeypatch, "adam_betas_swapped", spec, w)
    for step in range(3):
        x, y = _batch(spec, 5, seed=step)
        assert bug.train_step(x, y) == ref.train_step(x, y)
    for a, b in zip(ref.get_weights(), bug.get_weights()):
        np.testing.assert_array_equal(a, b)
    clean = numpy_scratch.Model(spec, w, F64)
    for step in range(3):
        clean.train_step(*_batch(spec, 5, seed=step))
    assert not np.array_equal(clean.get_weights()[0], bug.get_weights()[0])


def test_conv_kernel_transposed_is_the_oracle_on_the_kernel_with_its_spatial_axes_swapped(monkeypatch):
    spec = TINY_CNN
    w = init_weights(spec, 0)
    swapped = [w[0].transpose(1, 0, 2, 3), *w[1:]]
    x, y = _batch(spec, 5)
    ref = numpy_scratch.Model(spec, swapped, F64)
    bug = _bug(monkeypatch, "conv_kernel_transposed", spec, w)
    np.testing.assert_array_equal(bug.get_weights()[0], w[0])  # reported in the canonical layout
    loss, grads = ref.gradients(x, y)
    bloss, bgrads = bug.gradients(x, y)
    assert bloss == loss
    np.testing.assert_array_equal(bgrads[0], grads[0].transpose(1, 0, 2, 3))
    for g, b in zip(grads[1:], bgrads[1:]):
        np.testing.assert_array_equal(b, g)
    ref.train_step(x, y)
    bug.train_step(x, y)
    np.testing.assert_array_equal(bug.get_weights()[0], ref.get_weights()[0].transpose(1, 0, 2, 3))
    assert not np.array_equal(numpy_scratch.Model(spec, w, F64).gradients(x, y)[1][0], bgrads[0])


def test_flatten_chw_is_the_oracle_with_the_dense_kernels_rows_permuted(monkeypatch):
    spec = TINY_CNN
    w = init_weights(spec, 0)
    h, wd, c = spec.input_shapes()[1]
    perm = np.arange(h * wd * c).reshape(c, h, wd).transpose(1, 2, 0).ravel()  # (h, w, c) position -> (c, h, w) row
    permuted = [w[0], w[1], w[2][perm], w[3]]
    x, y = _batch(spec, 5)
    ref = numpy_scratch.Model(spec, permuted, F64)
    bug = _bug(monkeypatch, "flatten_chw", spec, w)
    loss, grads = ref.gradients(x, y)
    bloss, bgrads = bug.gradients(x, y)
    np.testing.assert_allclose(bloss, loss, rtol=1e-13)
    np.testing.assert_allclose(bgrads[2][perm], grads[2], rtol=1e-11, atol=1e-15)
    for j in (0, 1, 3):
        np.testing.assert_allclose(bgrads[j], grads[j], rtol=1e-11, atol=1e-15)
    np.testing.assert_allclose(bug.predict(x), ref.predict(x), rtol=1e-12)
    assert abs(numpy_scratch.Model(spec, w, F64).gradients(x, y)[0] - bloss) > 1e-6


def test_softmax_axis_takes_the_softmax_over_the_batch_with_its_true_gradient(monkeypatch):
    spec = TINY_MLP
    w = init_weights(spec, 0)
    x, y = _batch(spec, 5)
    bug = _bug(monkeypatch, "softmax_axis", spec, w)
    loss, grads = bug.gradients(x, y)
    out = np.tanh(x @ w[0] + w[1]) @ w[2] + w[3]
    logp = out - out.max(axis=0) - np.log(np.exp(out - out.max(axis=0)).sum(axis=0))
    assert loss == pytest.approx(-logp[np.arange(5), y].mean(), rel=1e-13)
    p = bug.predict(x)
    np.testing.assert_allclose(p.sum(axis=0), 1.0, rtol=1e-13)  # each class's column sums to 1, not each sample's row
    # the gradient is the true gradient of that (wrong) loss: central differences on the output bias and a kernel entry
    for j, idx in ((3, (1,)), (2, (2, 0)), (0, (1, 4))):
        d = 1e-6
        plus, minus = [a.copy() for a in w], [a.copy() for a in w]
        plus[j][idx] += d
        minus[j][idx] -= d
        num = (_bug(monkeypatch, "softmax_axis", spec, plus).gradients(x, y)[0]
               - _bug(monkeypatch, "softmax_axis", spec, minus).gradients(x, y)[0]) / (2 * d)
        assert grads[j][idx] == pytest.approx(num, rel=1e-6, abs=1e-9)
    one, g1 = _bug(monkeypatch, "softmax_axis", spec, w).gradients(x[:1], y[:1])
    assert one == 0 and all(not g.any() for g in g1)  # one sample: every probability is 1


def test_state_reset_restarts_the_optimizer_at_every_update(monkeypatch):
    spec = TINY_MLP  # Adam: each update is the first update of a fresh optimizer from the current weights
    w = init_weights(spec, 0)
    batches = [_batch(spec, 5, seed=s) for s in range(3)]
    bug = _bug(monkeypatch, "state_reset", spec, w)
    weights = w
    for x, y in batches:
        bug.train_step(x, y)
        fresh = numpy_scratch.Model(spec, weights, F64)
        fresh.train_step(x, y)
        weights = fresh.get_weights()
        for a, b in zip(weights, bug.get_weights()):
            np.testing.assert_array_equal(a, b)
    spec = dataclasses.replace(spec, optimizer=SGD(lr=0.1, momentum=f32(0.9)))  # momentum: plain SGD, buffer zeroed
    plain = numpy_scratch.Model(dataclasses.replace(spec, optimizer=SGD(lr=0.1)), w, F64)
    bug = _bug(monkeypatch, "state_reset", spec, w)
    for x, y in batches:
        plain.train_step(x, y)
        bug.train_step(x, y)
    for a, b in zip(plain.get_weights(), bug.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_activation_missing_skips_the_first_hidden_nonlinearity(monkeypatch):
    spec = MODELS["mlp_431"]  # Dense(3, sigmoid), Dense(1, sigmoid): the hidden sigmoid goes, the output one stays
    w = init_weights(spec, 0)
    x, y = _batch(spec, 3)
    bug = _bug(monkeypatch, "activation_missing", spec, w)
    z = (x @ w[0] + w[1]) @ w[2] + w[3]
    np.testing.assert_allclose(bug.predict(x), 1 / (1 + np.exp(-z)), rtol=1e-13)
    assert mutants.first_hidden_nonlinearity(MODELS["mnist_bn_cnn"]) == 2  # the Activation("relu") after BatchNorm


@pytest.mark.parametrize("bug,model", [
    ("adam_bias_step", "mlp_431"), ("adam_betas_swapped", "perceptron_or"), ("conv_kernel_transposed", "mnist_mlp"),
    ("flatten_chw", "mnist_mlp"), ("softmax_axis", "pima_mlp"), ("softmax_axis", "mlp_431"), ("state_reset", "mlp_431"),
    ("activation_missing", "perceptron_or"), ("flatten_chw", "one_channel"), ("conv_kernel_transposed", "1x1"),
])
def test_a_bug_the_model_cannot_have_is_unsupported(monkeypatch, bug, model):
    specs = {"one_channel": _spec([Conv2D(1, (3, 3)), Flatten(), Dense(2)], (5, 5, 1)),
             "1x1": _spec([Conv2D(2, (1, 1)), Flatten(), Dense(2)], (5, 5, 1))}
    spec = specs.get(model) or MODELS[model]
    with pytest.raises(Unsupported, match=bug):
        _bug(monkeypatch, bug, spec, init_weights(spec, 0))
