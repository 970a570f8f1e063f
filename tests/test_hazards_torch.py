"""The torch backend on the hazards-atlas vocabulary (issue 13), in-process.

* Aligned float64 against the NumPy oracle, to 1e-12 over several steps (loss and gradients before each step, the
  update's loss, the weights after it, predictions at the end): Conv2D "same" at stride 2 (odd and even inputs,
  symmetric and asymmetric pads), strided / overlapping MaxPool2D, AveragePooling2D valid and "same", LayerNorm on
  images and on the flat features of a Flatten (gamma / beta permuted), tanh / softmax / leaky_relu / gelu, mse, sparse
  categorical cross-entropy after a softmax, class weights, L2, SGD momentum in both forms and Nesterov under a step
  schedule crossing its boundaries, RMSprop and Adagrad with epsilon inside and outside the square root, AdamW with
  both decay forms and both epsilon conventions, ClipNorm global and per tensor; every optimizer both as torch's
  built-in (where it computes the spec) and hand-written (``extra["optimizer"]="manual"``: the update CUDA-graph fast
  mode captures).
* Native mode one key at a time (``extra["native_only"] = [key]``): each torch default measured against its closed
  form (the first update of RMSprop / Adagrad / AdamW / Adam, the padding and divisor of the pooled sums, ...) or
  against the oracle of the spec that says torch's setting, and named in ``info["native_settings"]``; a key that does
  not apply changes nothing, bit for bit.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import torch.nn.functional as F  # noqa: E402

import backends.numpy_scratch as ref  # noqa: E402
import backends.torch_eager as tb  # noqa: E402
from backends.base import NATIVE_KEYS, BuildOptions, Unsupported  # noqa: E402
from models import init_weights  # noqa: E402
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
    Flatten,
    Init,
    LayerNorm,
    Loss,
    MaxPool2D,
    ModelSpec,
    RMSprop,
    StepDecay,
    f32,
)
from tests.lockstep import scaled_error  # noqa: E402

TOL = 1e-12
SEED = 5
SSE = Loss("sse", "sum")  # predictions are the network's output


def _spec(name, input_shape, layers, loss=None, optimizer=None, init=None, batch_sizes=(1, 4), **kw) -> ModelSpec:
    probe = ModelSpec(name=name, description=name, input_shape=input_shape, layers=tuple(layers),
                      loss=loss or Loss("softmax_crossentropy", "mean"), optimizer=optimizer or SGD(0.1),
                      init=init or Init("glorot_uniform", "uniform", 0.1), dataset="toy_431", batch_sizes=batch_sizes,
                      epochs=1, expected_params=0, **kw)
    return probe.with_overrides(expected_params=probe.param_count())


def _mlp(name, hidden=(), out=3, **kw) -> ModelSpec:
    return _spec(name, (5,), [Dense(6), *hidden, Dense(out)], **kw)


def _batches(spec: ModelSpec, k: int, b: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    xs = rng.normal(size=(k, b) + tuple(spec.input_shape))
    if spec.loss.integer_labels:
        ys = rng.integers(0, spec.n_outputs, (k, b))
    elif spec.loss.kind == "binary_crossentropy":
        ys = (rng.random((k, b, spec.n_outputs)) > 0.5).astype(np.float64)
    else:
        ys = rng.normal(size=(k, b, spec.n_outputs))
    return xs, ys


def _model(spec, w=None, **kw) -> tb.Model:
    w = init_weights(spec, 1) if w is None else w
    return tb.Model(spec, w, BuildOptions(dtype="float64", seed=SEED, **kw))


def _oracle(spec, w=None) -> ref.Model:
    w = init_weights(spec, 1) if w is None else w
    return ref.Model(spec, w, BuildOptions(dtype="float64", seed=SEED))


def _assert_close(got, want, what, tol=TOL):
    assert len(got) == len(want), what
    for i, (a, b) in enumerate(zip(got, want)):
        assert np.shape(a) == np.shape(b), (what, i, np.shape(a), np.shape(b))
        assert scaled_error(a, b) <= tol, (what, i, scaled_error(a, b))


def lockstep(spec: ModelSpec, steps: int = 4, batch: int = 4, extra=None, oracle_spec=None, tol=TOL,
             w=None) -> tb.Model:
    """Train the torch model and the oracle (of ``oracle_spec``, default the same spec) side by side."""
    w = init_weights(spec, 1) if w is None else w
    m = _model(spec, w, extra=extra or {})
    o = _oracle(oracle_spec or spec, w)
    xs, ys = _batches(spec, steps, batch)
    for x, y in zip(xs, ys):
        loss, grads = m.gradients(x, y)
        loss_ref, grads_ref = o.gradients(x, y)
        assert abs(loss - loss_ref) <= tol * abs(loss_ref), (loss, loss_ref)
        _assert_close(grads, grads_ref, "gradients", tol)
        assert abs(m.train_step(x, y) - o.train_step(x, y)) <= tol * abs(loss_ref)
        _assert_close(m.get_weights(), o.get_weights(), "weights", tol)
    x = _batches(spec, 1, 5, seed=9)[0][0]
    _assert_close([m.predict(x)], [o.predict(x)], "predict", tol)
    return m


# ------------------------------------------------------------------------------------------- aligned: the layers
LAYER_SPECS = {
    # 6x6, k3 s2: pads (0, 1) each axis (PaddedConv2d); 7x7, k3 s2: pads (1, 1) (nn.Conv2d's own padding)
    "conv_same_s2_even": _spec("conv_same_s2_even", (6, 6, 2),
                               [Conv2D(3, (3, 3), "tanh", "same", strides=(2, 2)), Flatten(), Dense(3)]),
    "conv_same_s2_odd": _spec("conv_same_s2_odd", (7, 7, 1),
                              [Conv2D(3, (3, 3), "relu", "same", strides=(2, 2)), Flatten(), Dense(3)]),
    # a rectangular image, a 2x3 kernel and strides (2, 1): pads (0, 1) rows, (1, 1) columns
    "conv_same_rect": _spec("conv_same_rect", (5, 4, 2),
                            [Conv2D(2, (2, 3), "linear", "same", use_bias=False, strides=(2, 1)),
                             Activation("tanh"), Flatten(), Dense(2)]),
    "conv_valid_s2_softmax": _spec("conv_valid_s2_softmax", (7, 6, 2),
                                   [Conv2D(3, (3, 3), "softmax", strides=(2, 2)), Flatten(), Dense(3)]),
    "maxpool_overlap": _spec("maxpool_overlap", (7, 7, 2),
                             [Conv2D(3, (2, 2), "tanh"), MaxPool2D(3, strides=2), Flatten(), Dense(3)]),
    "avgpool_valid": _spec("avgpool_valid", (7, 6, 2),
                           [Conv2D(3, (2, 2), "tanh"), AveragePooling2D(2), Flatten(), Dense(3)]),
    # 6x6 pool 3 stride 2: pads (0, 1), SameAvgPool2d; 5x5 pool 3 stride 2: pads (1, 1), nn.AvgPool2d(count_include_pad=
    # False); pool 2 stride 1: pads (0, 1)
    "avgpool_same_asym": _spec("avgpool_same_asym", (7, 7, 2),
                               [Conv2D(3, (2, 2), "relu"), AveragePooling2D(3, 2, "same"), Flatten(), Dense(3)]),
    "avgpool_same_sym": _spec("avgpool_same_sym", (6, 6, 2),
                              [Conv2D(3, (2, 2), "tanh"), AveragePooling2D(3, 2, "same"), Flatten(), Dense(3)]),
    "avgpool_same_s1": _spec("avgpool_same_s1", (4, 5, 1),
                             [AveragePooling2D(2, 1, "same"), Conv2D(2, (2, 2), "tanh"), Flatten(), Dense(2)]),
    # LayerNorm on the channels of an image, and on the flat features of a Flatten ((c, h, w) order inside torch)
    "layernorm_image": _spec("layernorm_image", (5, 5, 2),
                             [Conv2D(4, (2, 2)), LayerNorm(), Activation("leaky_relu"), Flatten(), Dense(3)]),
    "layernorm_flat": _spec("layernorm_flat", (4, 5, 2),
                            [Conv2D(3, (2, 2), "relu"), Flatten(), LayerNorm(epsilon=f32(0.01)),
                             Activation("gelu", approximate="tanh"), Dense(3)]),
    "activations": _spec("activations", (5,),
                         [Dense(6, "tanh"), Activation("leaky_relu", negative_slope=f32(0.05)), Dense(6),
                          Activation("gelu"), Dense(5, "sigmoid"), Activation("softmax"), Dense(3)]),
    "softmax_image": _spec("softmax_image", (4, 4, 2),
                           [Conv2D(3, (2, 2)), Activation("softmax"), Flatten(), Dense(2, "tanh"), Dense(2)]),
}


@pytest.mark.parametrize("name", list(LAYER_SPECS))
def test_aligned_layers_match_the_oracle(name):
    lockstep(LAYER_SPECS[name], steps=3)


def test_aligned_layers_use_torch_ops_where_they_compute_the_spec():
    mods = {name: [type(m).__name__ for m in _model(s).net] for name, s in LAYER_SPECS.items()}
    assert mods["conv_same_s2_even"][0] == "PaddedConv2d"
    assert mods["conv_same_s2_odd"][0] == "Conv2d"
    assert mods["avgpool_same_asym"][2] == "SameAvgPool2d"
    assert mods["avgpool_same_sym"][2] == "AvgPool2d"
    assert "ChannelsLastLayerNorm" in mods["layernorm_image"]
    sym = _model(LAYER_SPECS["avgpool_same_sym"]).net[2]
    assert sym.count_include_pad is False and sym.padding == (1, 1)
    assert _model(LAYER_SPECS["conv_same_s2_odd"]).net[0].padding == (1, 1)


def test_layernorm_vectors_after_a_flatten_are_permuted():
    """gamma / beta of a LayerNorm on the flat features of a Flatten follow torch's (c, h, w) order: the layout plan
    permutes them like a Dense's rows; without it the gradients of gamma and beta come out in the wrong order."""
    spec = LAYER_SPECS["layernorm_flat"]
    plan = tb.layout_plan(spec)
    rows = tuple(tb.flatten_rows(3, 4, 3))
    assert [p.kind for p in plan] == ["conv", "bias", "vector", "vector", "dense", "bias"]
    assert plan[2].rows == plan[3].rows == plan[4].rows == rows
    w = init_weights(spec, 2)
    w[2] = np.random.default_rng(0).uniform(0.5, 1.5, w[2].shape)  # gamma: not all ones, so that order matters
    assert all(np.array_equal(a, b) for a, b in zip(tb.from_torch_layout(plan, tb.to_torch_layout(plan, w)), w))
    x, y = _batches(spec, 1, 3)
    _, grads = _model(spec, w).gradients(x[0], y[0])
    _, grads_ref = _oracle(spec, w).gradients(x[0], y[0])
    _assert_close(grads, grads_ref, "gradients")
    assert scaled_error(grads[3][list(rows)], grads_ref[3]) > 1e-3  # the unpermuted order would be told apart


# ------------------------------------------------------------------------------------------- aligned: the losses
LOSS_SPECS = {
    "mse_1": _mlp("mse_1", [Activation("tanh")], out=1, loss=Loss("mse", "mean")),
    "mse_3_sum": _mlp("mse_3_sum", out=3, loss=Loss("mse", "sum")),
    "sparse_cce": _spec("sparse_cce", (5,), [Dense(6, "tanh"), Dense(3, "softmax")],
                        loss=Loss("sparse_categorical_crossentropy", "mean")),
    "sparse_cce_weighted_sum": _spec("sparse_cce_weighted_sum", (5,), [Dense(6, "tanh"), Dense(3, "softmax")],
                                     loss=Loss("sparse_categorical_crossentropy", "sum", (1.0, 2.0, 0.5))),
    "cce_weighted": _mlp("cce_weighted", [Activation("tanh")], loss=Loss("softmax_crossentropy", "mean",
                                                                         (1.0, 3.0, 0.25))),
    "l2": _spec("l2", (4, 4, 1), [Conv2D(2, (2, 2), "relu"), Flatten(), Dense(4, "tanh"), LayerNorm(), Dense(2)],
                loss=Loss("binary_crossentropy", "mean", l2=f32(0.01)), optimizer=Adam(lr=f32(0.01))),
}


@pytest.mark.parametrize("name", list(LOSS_SPECS))
def test_aligned_losses_match_the_oracle(name):
    lockstep(LOSS_SPECS[name], steps=3, batch=5)


def test_class_weights_and_l2_change_the_numbers():
    """The loss tests can fail: the weights and the penalty move the loss (so agreement above is not vacuous)."""
    for name, plain in (("cce_weighted", Loss("softmax_crossentropy", "mean")),
                        ("l2", Loss("binary_crossentropy", "mean"))):
        spec = LOSS_SPECS[name]
        x, y = _batches(spec, 1, 5)
        a = _model(spec).gradients(x[0], y[0])[0]
        b = _model(spec.with_overrides(loss=plain)).gradients(x[0], y[0])[0]
        assert abs(a - b) > 1e-4 * abs(b), name


# --------------------------------------------------------------------------------------- aligned: the optimizers
_DECAY = StepDecay(2, f32(0.5))
OPT_SPECS = {
    "sgd_accumulator_schedule": dict(optimizer=SGD(0.1, f32(0.9)), schedule=_DECAY),
    "sgd_velocity_schedule": dict(optimizer=SGD(0.1, f32(0.9), momentum_form="velocity"), schedule=_DECAY),
    "sgd_nesterov_accumulator": dict(optimizer=SGD(0.1, f32(0.8), nesterov=True), schedule=_DECAY),
    "sgd_nesterov_velocity": dict(optimizer=SGD(0.1, f32(0.8), nesterov=True, momentum_form="velocity"),
                                  schedule=_DECAY),
    "sgd_plain_schedule": dict(optimizer=SGD(0.2), schedule=StepDecay(3, f32(0.1))),
    "rmsprop_inside": dict(optimizer=RMSprop(f32(0.01))),
    "rmsprop_outside": dict(optimizer=RMSprop(f32(0.01), f32(0.8), f32(1e-3), epsilon_inside_sqrt=False)),
    "rmsprop_start_1": dict(optimizer=RMSprop(f32(0.01), initial_accumulator=1.0), schedule=_DECAY),
    "adagrad_inside": dict(optimizer=Adagrad(f32(0.05))),
    "adagrad_outside": dict(optimizer=Adagrad(f32(0.05), epsilon=f32(1e-3), epsilon_inside_sqrt=False),
                            schedule=_DECAY),
    "adamw_times_lr": dict(optimizer=AdamW(f32(0.01), weight_decay=f32(0.1))),
    "adamw_times_lr_eps_v_hat": dict(optimizer=AdamW(f32(0.01), weight_decay=f32(0.1), convention="eps_v_hat"),
                                     schedule=_DECAY),
    "adamw_no_lr": dict(optimizer=AdamW(f32(0.01), weight_decay=f32(0.05), decay_times_lr=False)),
    "adamw_no_lr_eps_v_hat": dict(optimizer=AdamW(f32(0.01), weight_decay=f32(0.05), decay_times_lr=False,
                                                  convention="eps_v_hat")),
    "adam_schedule": dict(optimizer=Adam(f32(0.01)), schedule=_DECAY),
    "clip_global": dict(optimizer=SGD(0.1, f32(0.9)), clip=ClipNorm(f32(0.05), "global")),
    "clip_per_tensor": dict(optimizer=RMSprop(f32(0.01)), clip=ClipNorm(f32(0.05), "per_tensor")),
    # some tensors' norms above 0.5, some below (a coefficient above 1 must not scale those up)
    "clip_per_tensor_mixed": dict(optimizer=SGD(0.1), clip=ClipNorm(f32(0.5), "per_tensor")),
    "clip_adamw_l2": dict(optimizer=AdamW(f32(0.01)), clip=ClipNorm(f32(0.05), "global"),
                          loss=Loss("softmax_crossentropy", "mean", l2=f32(0.01))),
}
# the built-in torch.optim class where it computes the spec (None: hand-written)
BUILT_IN = {"sgd_accumulator_schedule": "SGD", "sgd_velocity_schedule": None, "sgd_nesterov_accumulator": "SGD",
            "sgd_nesterov_velocity": None, "sgd_plain_schedule": "SGD", "rmsprop_inside": None,
            "rmsprop_outside": "RMSprop", "rmsprop_start_1": None, "adagrad_inside": None,
            "adagrad_outside": "Adagrad", "adamw_times_lr": None, "adamw_times_lr_eps_v_hat": "AdamW",
            "adamw_no_lr": None, "adamw_no_lr_eps_v_hat": None, "adam_schedule": None, "clip_global": "SGD",
            "clip_per_tensor": None, "clip_per_tensor_mixed": "SGD", "clip_adamw_l2": None}


def _opt_spec(name):
    return _mlp(name, [Activation("tanh")], **OPT_SPECS[name])


@pytest.mark.parametrize("impl", ["auto", "manual"])
@pytest.mark.parametrize("name", list(OPT_SPECS))
def test_aligned_optimizers_match_the_oracle(name, impl):
    """Five steps cross the schedule's boundaries (every 2 updates); the built-in and the hand-written update both."""
    m = lockstep(_opt_spec(name), steps=5, extra={"optimizer": impl})
    built_in = BUILT_IN[name] if impl == "auto" else None
    assert (type(m.torch_opt).__name__ if m.torch_opt is not None else None) == built_in, m.info["optimizer"]
    assert m.info["optimizer"].startswith("built-in" if built_in else "hand-written")


def test_the_schedule_and_clipping_bite():
    """The optimizer tests can fail: the schedule changes the lr, the clip threshold is below the gradient norms."""
    spec = _opt_spec("sgd_velocity_schedule")
    assert [spec.lr_at(t) for t in range(5)] == [0.1, 0.1, 0.05, 0.05, 0.025]
    for name in ("clip_global", "clip_per_tensor"):
        spec = _opt_spec(name)
        x, y = _batches(spec, 1, 4)
        _, grads = _model(spec).gradients(x[0], y[0])
        assert min(np.linalg.norm(g) for g in grads) > spec.clip.max_norm, name
        unclipped = _model(spec.with_overrides(clip=None))
        clipped = _model(spec)
        unclipped.train_step(x[0], y[0])
        clipped.train_step(x[0], y[0])
        assert scaled_error(clipped.get_weights()[0], unclipped.get_weights()[0]) > 1e-4
    spec = _opt_spec("clip_per_tensor_mixed")
    x, y = _batches(spec, 1, 4)
    norms = [np.linalg.norm(g) for g in _model(spec).gradients(x[0], y[0])[1]]
    assert min(norms) < spec.clip.max_norm < max(norms), norms


@pytest.mark.parametrize("name", ["rmsprop_outside", "adagrad_outside", "sgd_nesterov_accumulator"])
def test_fused_train_steps_follow_the_schedule(name):
    spec = _opt_spec(name)
    m, o = _model(spec), _oracle(spec)
    xs, ys = _batches(spec, 5, 3, seed=2)
    want = o.train_steps(xs, ys)
    got = np.concatenate([m.train_steps(xs[:2], ys[:2]), m.train_steps(*m.to_device(xs[2:], ys[2:]))])
    assert scaled_error(got, want) < TOL
    _assert_close(m.get_weights(), o.get_weights(), "weights")


def test_extra_optimizer_is_checked():
    with pytest.raises(ValueError, match="extra\\['optimizer'\\]"):
        _model(_opt_spec("rmsprop_inside"), extra={"optimizer": "fast"})


# ------------------------------------------------------------------------------------ native mode, key by key
def _native(spec, keys, w=None, optimizer="auto", **kw) -> tb.Model:
    return _model(spec, w, mode="native", extra={"native_only": list(keys), "optimizer": optimizer}, **kw)


def _first_update(spec, keys, w=None, optimizer="auto"):
    """(native model, w0, gradient at w0, w1) of one update on a batch of 4."""
    w = init_weights(spec, 1) if w is None else w
    m = _native(spec, keys, w, optimizer)
    x, y = _batches(spec, 1, 4)
    _, g = m.gradients(x[0], y[0])
    m.train_step(x[0], y[0])
    return m, w, g, m.get_weights()


def _settings(m) -> dict:
    return m.info["native_settings"]


def test_native_conv_same_padding_is_symmetric_k_over_2():
    """torch refuses padding='same' at stride 2; a torch user's padding=k//2 pads (1, 1) where TF pads (0, 1)."""
    with pytest.raises(ValueError, match="not supported for strided convolutions"):
        torch.nn.Conv2d(1, 1, 3, stride=2, padding="same")
    spec = LAYER_SPECS["conv_same_s2_even"]
    w = init_weights(spec, 1)
    m = _native(spec, ["conv_same_padding"], w)
    assert _settings(m) == {"conv_same_padding": "nn.Conv2d(stride=(2, 2), padding=(1, 1))"}
    assert any("torch padding=(1, 1)" in d for d in m.info["native_differences"])
    x = np.random.default_rng(0).normal(size=(2, 6, 6, 2))
    xt = torch.from_numpy(x).permute(0, 3, 1, 2)
    kt = torch.from_numpy(w[0]).permute(3, 2, 0, 1)
    z = torch.tanh(F.conv2d(F.pad(xt, (1, 1, 1, 1)), kt, torch.from_numpy(w[1]), stride=2))
    logits = z.reshape(2, -1).numpy() @ w[2][list(tb.flatten_rows(3, 3, 3))] + w[3]
    want = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)  # the softmax of the prediction
    assert scaled_error(m.predict(x), want) < 1e-13
    assert scaled_error(_model(spec, w).predict(x), want) > 1e-3  # the spec's pads give other numbers


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")
def test_native_conv_same_padding_at_stride_1_is_torch_same():
    """At stride 1 a torch user writes padding='same', which pads as TF (even kernel: the extra pixel right/bottom)."""
    spec = _spec("conv_same_s1", (5, 6, 2), [Conv2D(3, (2, 2), "tanh", "same"), Flatten(), Dense(2)])
    m = _native(spec, ["conv_same_padding"])
    assert m.net[0].padding == "same" and _settings(m) == {}
    x = np.random.default_rng(1).normal(size=(3, 5, 6, 2))
    assert scaled_error(m.predict(x), _oracle(spec).predict(x)) < TOL


def test_native_conv_same_padding_with_an_even_kernel_at_stride_2_changes_shapes():
    spec = _spec("conv_even_s2", (6, 6, 1), [Conv2D(2, (2, 2), padding="same", strides=(2, 2)), Flatten(), Dense(2)])
    with pytest.raises(Unsupported, match="4x4 output where the spec's 'same' gives 3x3"):
        _native(spec, ["conv_same_padding"])
    _model(spec)  # aligned: fine


def test_native_avgpool_counts_padded_zeros():
    """nn.AvgPool2d(3, 2, padding=1) with count_include_pad=True (its default): the window sum over the zero-padded
    image / 9, also at the border (measured: the corner of an image of ones is 4/9)."""
    assert torch.nn.AvgPool2d(3).count_include_pad is True
    ones = torch.ones(1, 1, 3, 3, dtype=torch.float64)
    assert torch.nn.AvgPool2d(3, 1, padding=1)(ones)[0, 0, 0, 0].item() == pytest.approx(4 / 9, rel=1e-15)
    spec = _spec("avgpool_only", (6, 6, 1), [AveragePooling2D(3, 2, "same"), Flatten(), Dense(2)], loss=SSE)
    w = init_weights(spec, 1)
    m = _native(spec, ["avgpool_count_pad"], w)
    assert _settings(m) == {"avgpool_count_pad": "nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=True)"}
    x = np.random.default_rng(0).normal(size=(2, 6, 6, 1))
    xp = np.pad(x[..., 0], ((0, 0), (1, 1), (1, 1)))
    pooled = np.array([[[xp[n, 2 * i:2 * i + 3, 2 * j:2 * j + 3].sum() / 9 for j in range(3)] for i in range(3)]
                       for n in range(2)])
    want = pooled.reshape(2, 9) @ w[0] + w[1]
    assert scaled_error(m.predict(x), want) < 1e-13
    assert scaled_error(_model(spec, w).predict(x), want) > 1e-3


def test_native_layernorm_epsilon_is_1e_5():
    spec = _spec("ln_only", (4,), [LayerNorm(), Dense(2)], loss=SSE)
    w = init_weights(spec, 1)
    w[0] = np.array([1.0, 2.0, 0.5, 1.5])
    m = _native(spec, ["layernorm_epsilon"], w)
    assert torch.nn.LayerNorm(4).eps == 1e-5
    assert _settings(m) == {"layernorm_epsilon": "nn.LayerNorm(4, eps=1e-05)"}
    x = np.random.default_rng(0).normal(size=(3, 4)) * 0.05  # a small variance: epsilon shows
    want = (x - x.mean(1, keepdims=True)) / np.sqrt(x.var(1, keepdims=True) + 1e-5) * w[0] + w[1]
    assert scaled_error(m.predict(x), want @ w[2] + w[3]) < 1e-13
    assert scaled_error(_model(spec, w).predict(x), want @ w[2] + w[3]) > 1e-2


def test_native_activation_defaults():
    spec = _spec("acts", (4,), [Activation("leaky_relu"), Activation("gelu", approximate="tanh"), Dense(2)], loss=SSE)
    w = init_weights(spec, 1)
    x = np.random.default_rng(0).normal(size=(5, 4))
    leaky = _native(spec, ["leaky_relu_slope"], w)
    assert _settings(leaky) == {"leaky_relu_slope": "nn.LeakyReLU(negative_slope=0.01)"}
    gelu = _native(spec, ["gelu_approximation"], w)
    assert _settings(gelu) == {"gelu_approximation": "nn.GELU(approximate='none')"}

    def net(slope, exact):
        a = np.where(x > 0, x, slope * x)
        c = math.sqrt(2 / math.pi)
        g = (0.5 * a * (1 + np.vectorize(math.erf)(a / math.sqrt(2))) if exact
             else 0.5 * a * (1 + np.tanh(c * (a + 0.044715 * a**3))))
        return g @ w[0] + w[1]

    assert scaled_error(leaky.predict(x), net(0.01, False)) < 1e-13
    assert scaled_error(gelu.predict(x), net(f32(0.2), True)) < 1e-13
    assert scaled_error(_model(spec, w).predict(x), net(f32(0.2), False)) < 1e-13
    # the spec's default gelu is torch's: nothing differs
    assert _settings(_native(_spec("g", (4,), [Activation("gelu"), Dense(2)]), ["gelu_approximation"])) == {}


def test_native_mse_broadcasts_n_by_n():
    spec = LOSS_SPECS["mse_1"]
    m = _native(spec, ["mse_broadcast"])
    assert _settings(m) == {"mse_broadcast": "nn.MSELoss()(out, y.reshape(-1))"}
    x, y = _batches(spec, 1, 4)
    out = m.predict(x[0])  # (4, 1)
    loss, _ = m.gradients(x[0], y[0])
    assert loss == pytest.approx(((out - y[0][:, 0][None, :]) ** 2).mean(), rel=1e-13)  # (4, 4) differences
    assert loss != pytest.approx(((out - y[0]) ** 2).mean(), rel=1e-3)
    assert _settings(_native(LOSS_SPECS["mse_3_sum"], ["mse_broadcast"])) == {}  # 3 outputs: shapes match


def test_native_sparse_cce_applies_softmax_twice():
    spec = LOSS_SPECS["sparse_cce"]
    m = _native(spec, ["sparse_cce_probabilities"])
    assert _settings(m) == {"sparse_cce_probabilities": "nn.CrossEntropyLoss()(probabilities, y)"}
    x, y = _batches(spec, 1, 4)
    p = m.predict(x[0])
    lp = p - np.log(np.exp(p).sum(1, keepdims=True))
    assert m.gradients(x[0], y[0])[0] == pytest.approx(-lp[np.arange(4), y[0]].mean(), rel=1e-13)


@pytest.mark.parametrize("name", ["cce_weighted", "sparse_cce"])
def test_native_class_weights_divide_by_the_sum_of_the_batch_weights(name):
    spec = LOSS_SPECS[name]
    spec = spec.with_overrides(loss=Loss(spec.loss.kind, "mean", (1.0, 3.0, 0.25)))
    m = _native(spec, ["class_weight_denominator"])
    assert "weight=class_weights" in _settings(m)["class_weight_denominator"]
    x, y = _batches(spec, 1, 6)
    w = np.array([1.0, 3.0, 0.25])[y[0]]
    spec_loss, _ = _model(spec).gradients(x[0], y[0])  # sum(w*l) / N
    assert m.gradients(x[0], y[0])[0] == pytest.approx(spec_loss * len(w) / w.sum(), rel=1e-13)
    summed = spec.with_overrides(loss=Loss(spec.loss.kind, "sum", (1.0, 3.0, 0.25)))
    assert _settings(_native(summed, ["class_weight_denominator"])) == {}  # a sum has no denominator


def test_native_loss_form():
    sse = _mlp("sse", loss=Loss("sse", "mean"))
    m = _native(sse, ["loss_form"])
    assert _settings(m) == {"loss_form": "nn.MSELoss()"}
    x, y = _batches(sse, 1, 4)
    assert m.gradients(x[0], y[0])[0] == pytest.approx(_model(sse).gradients(x[0], y[0])[0] / 3, rel=1e-13)
    bce = _mlp("bce", out=2, loss=Loss("binary_crossentropy", "mean"))
    m = _native(bce, ["loss_form"])
    assert "nn.BCELoss" in _settings(m)["loss_form"] and type(m.net[-1]).__name__ == "Sigmoid"
    x, y = _batches(bce, 1, 4)
    assert scaled_error(m.predict(x[0]), _model(bce).predict(x[0])) < 1e-15  # the sigmoid once, not twice


def test_native_momentum_form_is_torch_accumulator():
    """torch.optim.SGD's accumulator form where the spec says velocity: the oracle of the accumulator spec."""
    spec = _opt_spec("sgd_nesterov_velocity")
    m = _native(spec, ["momentum_form"])
    assert "torch.optim.SGD(momentum=0.8, nesterov=True)" in _settings(m)["momentum_form"]
    assert type(m.torch_opt).__name__ == "SGD"
    spec_acc = spec.with_overrides(optimizer=SGD(0.1, f32(0.8), nesterov=True))
    o = _oracle(spec_acc)
    xs, ys = _batches(spec, 5, 4)
    assert scaled_error(m.train_steps(xs, ys), o.train_steps(xs, ys)) < TOL
    _assert_close(m.get_weights(), o.get_weights(), "weights")
    assert _settings(_native(_opt_spec("sgd_accumulator_schedule"), ["momentum_form"])) == {}


def _one_weight(optimizer, y=0.95, **kw) -> ModelSpec:
    """w = 1, x = 1, sse: the gradient at w is 2*(w - y) = 0.1 (the golden facts' g)."""
    return _spec("one_weight", (1,), [Dense(1, use_bias=False)], loss=Loss("sse", "sum"), optimizer=optimizer,
                 init=Init(explicit=((1.0,),)), **kw)


def _golden_first_step(spec, keys) -> float:
    m = _native(spec, keys)
    m.train_step(np.ones((1, 1)), np.full((1, 1), 0.95))
    return float(m.get_weights()[0][0, 0]) - 1.0


def test_native_rmsprop_and_adagrad_golden_first_updates():
    """The first update at lr 1e-3 (RMSprop) / 1e-2 (Adagrad) on g = 0.1: torch -1.0e-2 both (Keras: -3.16e-3,
    -3.0e-3, which is the spec's default form)."""
    rms, ada = _one_weight(RMSprop(f32(1e-3))), _one_weight(Adagrad(f32(1e-2)))
    assert f"{_golden_first_step(rms, ['rmsprop_rho', 'rmsprop_epsilon']):.3g}" == "-0.01"
    assert f"{_golden_first_step(ada, ['adagrad_accumulator', 'adagrad_epsilon']):.3g}" == "-0.01"
    assert f"{_golden_first_step(rms, []):.3g}" == "-0.00316"
    assert f"{_golden_first_step(ada, []):.2g}" == "-0.003"


RMS = RMSprop(f32(0.01), initial_accumulator=0.5)


@pytest.mark.parametrize("key,setting,v_eps", [
    ("rmsprop_rho", "torch.optim.RMSprop(alpha=0.99)", lambda g: (0.99 * 0.5 + 0.01 * g * g, f32(1e-7), True)),
    ("rmsprop_epsilon", "torch.optim.RMSprop(eps=1e-08): sqrt(v) + eps",
     lambda g: (f32(0.9) * 0.5 + (1 - f32(0.9)) * g * g, 1e-8, False)),
    ("rmsprop_accumulator", "torch.optim.RMSprop: square_avg starts at 0",
     lambda g: ((1 - f32(0.9)) * g * g, f32(1e-7), True)),
])
def test_native_rmsprop_first_update(key, setting, v_eps):
    spec = _mlp("rms", [Activation("tanh")], optimizer=RMS)
    m, w0, g, w1 = _first_update(spec, [key])
    assert _settings(m) == {key: setting}
    for a, b, gi in zip(w1, w0, g):
        v, eps, inside = v_eps(gi)
        want = b - f32(0.01) * gi / (np.sqrt(v + eps) if inside else np.sqrt(v) + eps)
        assert scaled_error(a, want) < 1e-13


@pytest.mark.parametrize("key,setting,acc,eps,inside", [
    ("adagrad_accumulator", "torch.optim.Adagrad(initial_accumulator_value=0)", 0.0, f32(1e-7), True),
    ("adagrad_epsilon", "torch.optim.Adagrad(eps=1e-10): sqrt(sum) + eps", f32(0.1), 1e-10, False),
])
def test_native_adagrad_first_update(key, setting, acc, eps, inside):
    spec = _mlp("ada", [Activation("tanh")], optimizer=Adagrad(f32(0.05)))
    m, w0, g, w1 = _first_update(spec, [key])
    assert _settings(m) == {key: setting}
    for a, b, gi in zip(w1, w0, g):
        s = acc + gi * gi
        assert scaled_error(a, b - f32(0.05) * gi / (np.sqrt(s + eps) if inside else np.sqrt(s) + eps)) < 1e-13


def _adam_first(g, lr, eps, convention):
    """The first Adam update (m = (1-b1) g, v = (1-b2) g^2; the spec's default beta2)."""
    b2 = f32(0.999)
    if convention == "eps_hat":
        return lr * math.sqrt(1 - b2) * g / (np.sqrt((1 - b2) * g * g) + eps)
    return lr * g / (np.abs(g) + eps)


def test_native_adam_epsilon_first_update():
    spec = _mlp("adam", [Activation("tanh")], optimizer=Adam(f32(0.01)))
    m, w0, g, w1 = _first_update(spec, ["adam_epsilon"])
    assert _settings(m) == {"adam_epsilon": "torch.optim.Adam(eps=1e-08)"}
    assert m.info["optimizer"].startswith("hand-written, spec convention (eps_hat)")
    for a, b, gi in zip(w1, w0, g):
        assert scaled_error(a, b - _adam_first(gi, f32(0.01), 1e-8, "eps_hat")) < 1e-13


def test_native_adam_convention_is_the_oracle_of_eps_v_hat():
    spec = _mlp("adam", [Activation("tanh")], optimizer=Adam(f32(0.01)))
    m = _native(spec, ["adam_convention"])
    assert set(_settings(m)) == {"adam_convention"} and type(m.torch_opt).__name__ == "Adam"
    o = _oracle(spec.with_overrides(optimizer=Adam(f32(0.01), convention="eps_v_hat")))
    xs, ys = _batches(spec, 4, 4)
    assert scaled_error(m.train_steps(xs, ys), o.train_steps(xs, ys)) < TOL
    _assert_close(m.get_weights(), o.get_weights(), "weights")


def test_native_adamw_weight_decay_first_update():
    """torch.optim.AdamW(weight_decay=1e-2): p *= 1 - lr*0.01, then the (spec's eps_hat) Adam update."""
    assert tb.torch_defaults(torch.optim.AdamW)["weight_decay"] == 0.01
    spec = _mlp("adamw", [Activation("tanh")], optimizer=AdamW(f32(0.01)))
    m, w0, g, w1 = _first_update(spec, ["adamw_weight_decay"])
    assert _settings(m) == {"adamw_weight_decay": "torch.optim.AdamW(weight_decay=0.01)"}
    for a, b, gi in zip(w1, w0, g):
        want = b - f32(0.01) * 0.01 * b - _adam_first(gi, f32(0.01), f32(1e-7), "eps_hat")
        assert scaled_error(a, want) < 1e-13


def test_native_adamw_decay_form_multiplies_by_lr():
    spec = _mlp("adamw", [Activation("tanh")], optimizer=AdamW(f32(0.01), weight_decay=f32(0.05),
                                                               decay_times_lr=False, convention="eps_v_hat"),
                schedule=_DECAY)
    times_lr = spec.with_overrides(optimizer=AdamW(f32(0.01), weight_decay=f32(0.05), convention="eps_v_hat"))
    m = _native(spec, ["adamw_decay_form"])
    assert _settings(m) == {"adamw_decay_form": "torch.optim.AdamW: p *= 1 - lr*weight_decay"}
    assert type(m.torch_opt).__name__ == "AdamW"  # now torch's own computes it
    o = _oracle(times_lr)
    xs, ys = _batches(spec, 5, 4)
    assert scaled_error(m.train_steps(xs, ys), o.train_steps(xs, ys)) < TOL
    _assert_close(m.get_weights(), o.get_weights(), "weights")


@pytest.mark.parametrize("impl", ["auto", "manual"])
def test_native_l2_is_torch_weight_decay_on_every_parameter(impl):
    """weight_decay=l2: the loss has no penalty, and the update adds l2*p to every gradient (biases too); the built-in
    torch.optim.SGD(weight_decay=l2) and the hand-written update alike."""
    spec = _mlp("l2", [Activation("tanh")], optimizer=SGD(0.1),
                loss=Loss("softmax_crossentropy", "mean", l2=f32(0.01)))
    w = init_weights(spec, 1)
    w[1] = np.full_like(w[1], 0.3)  # a nonzero bias: its decay shows
    m, w0, g, w1 = _first_update(spec, ["l2_regularization"], w, optimizer=impl)
    assert _settings(m) == {"l2_regularization": "torch.optim.SGD(weight_decay=0.01), no penalty in the loss"}
    assert (m.torch_opt is not None) == (impl == "auto")
    x, y = _batches(spec, 1, 4)
    o = _oracle(spec.with_overrides(loss=Loss("softmax_crossentropy", "mean")), w)
    assert _native(spec, ["l2_regularization"], w).gradients(x[0], y[0])[0] == pytest.approx(
        o.gradients(x[0], y[0])[0], rel=1e-14)
    for a, b, gi in zip(w1, w0, g):
        assert scaled_error(a, b - 0.1 * (gi + f32(0.01) * b)) < 1e-13
    assert _settings(_native(spec.with_overrides(optimizer=AdamW(f32(0.01))), ["l2_regularization"])) == {}


def test_native_clip_scope_is_global():
    spec = _opt_spec("clip_per_tensor")
    m = lockstep(spec, steps=3)
    m = _native(spec, ["clip_scope"])
    assert _settings(m) == {"clip_scope": "torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.05)"}
    o = _oracle(spec.with_overrides(clip=ClipNorm(f32(0.05), "global")))
    xs, ys = _batches(spec, 3, 4)
    assert scaled_error(m.train_steps(xs, ys), o.train_steps(xs, ys)) < TOL
    _assert_close(m.get_weights(), o.get_weights(), "weights")


def test_native_clip_epsilon_is_clip_grad_norm():
    """torch.nn.utils.clip_grad_norm_ scales by max_norm / (norm + 1e-6) (measured on a [3, 4] gradient)."""
    p = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    p.grad = torch.tensor([3.0, 4.0], dtype=torch.float64)
    torch.nn.utils.clip_grad_norm_([p], 1.0)
    assert p.grad[0].item() == pytest.approx(3 / (5 + tb.TORCH_CLIP_EPS), rel=1e-15)
    spec = _mlp("clip", [Activation("tanh")], optimizer=SGD(0.1), clip=ClipNorm(f32(0.05), "global"))
    m, w0, g, w1 = _first_update(spec, ["clip_epsilon"])
    assert _settings(m) == {"clip_epsilon": "torch.nn.utils.clip_grad_norm_: max_norm / (total_norm + 1e-06)"}
    norm = math.sqrt(sum(float((gi * gi).sum()) for gi in g))
    for a, b, gi in zip(w1, w0, g):
        assert scaled_error(a, b - 0.1 * gi * (f32(0.05) / (norm + 1e-6))) < 1e-13


@pytest.mark.parametrize("name", ["sgd_accumulator_schedule", "rmsprop_start_1"])
def test_native_lr_schedule_is_step_lr(name):
    """torch's StepLR stepped per update: on the built-in optimizer, or on the holder the hand-written one reads;
    equal to the spec up to the rounding of a repeated product."""
    spec = _opt_spec(name)
    m = _native(spec, ["lr_schedule"])
    assert _settings(m) == {"lr_schedule": "torch.optim.lr_scheduler.StepLR(step_size=2, gamma=0.5) stepped after "
                                           "every update"}
    o = _oracle(spec)
    xs, ys = _batches(spec, 5, 4)
    assert scaled_error(m.train_steps(xs, ys), o.train_steps(xs, ys)) < 1e-13
    _assert_close(m.get_weights(), o.get_weights(), "weights", 1e-13)
    opt, holder, _ = m.schedule
    assert (holder is None) == (m.torch_opt is not None)
    assert opt.param_groups[0]["lr"] == spec.lr_at(5)  # after 5 updates: the lr of update 5


def test_native_batchnorm_keys_one_at_a_time():
    spec = _spec("bn", (5,), [Dense(4, use_bias=False), BatchNorm(), Activation("sigmoid"), Dense(2)],
                 loss=Loss("sse", "sum"), batch_sizes=(2, 4))
    w = init_weights(spec, 1)
    x, y = _batches(spec, 1, 6, seed=7)
    x, y = x[0], y[0]
    h = x @ w[0]
    # momentum alone: torch's 0.1 weight of the new value, the spec's biased variance
    m = _native(spec, ["batchnorm_momentum"], w)
    assert _settings(m) == {"batchnorm_momentum": "nn.BatchNorm1d(momentum=0.1)"}
    m.train_step(x, y)
    mean, var = m.get_state()
    assert scaled_error(mean, 0.1 * h.mean(0)) < 1e-13 and scaled_error(var, 0.9 + 0.1 * h.var(0)) < 1e-13
    # variance alone: the oracle of the spec that stores the unbiased variance
    m = _native(spec, ["batchnorm_variance"], w)
    assert _settings(m) == {"batchnorm_variance": "nn.BatchNorm1d(): unbiased running_var"}
    o = _oracle(spec.with_overrides(layers=(Dense(4, use_bias=False), BatchNorm(unbiased_moving_variance=True),
                                            Activation("sigmoid"), Dense(2))), w)
    m.train_step(x, y)
    o.train_step(x, y)
    _assert_close(m.get_state(), o.get_state(), "state")
    # epsilon alone: inference with the moving statistics (0, 1) and eps 1e-5
    m = _native(spec, ["batchnorm_epsilon"], w)
    assert _settings(m) == {"batchnorm_epsilon": "nn.BatchNorm1d(eps=1e-05)"}
    want = 1 / (1 + np.exp(-h / np.sqrt(1 + 1e-5))) @ w[3] + w[4]
    assert scaled_error(m.predict(x), want) < 1e-13
    assert type(m.net[1]).__name__ == "AlignedBatchNorm"
    assert type(_native(spec, list(tb._BN_KEYS), w).net[1]).__name__ == "BatchNorm1d"  # all three: torch's own


def test_native_dropout_rng_alone():
    from models.spec import Dropout

    spec = _spec("drop", (6,), [Dense(5), Dropout(0.5), Dense(2)], loss=Loss("sse", "sum"))
    m = _native(spec, ["dropout_rng"])
    assert _settings(m) == {"dropout_rng": "nn.Dropout(p=0.5), torch's RNG"} and m.masked == []
    assert m.info["dropout"].startswith("nn.Dropout")
    assert _native(spec, ["lr_schedule"]).masked  # any other key: the harness's masks


def test_native_matmul_precision_changes_nothing_on_cpu():
    spec = LAYER_SPECS["conv_same_s2_odd"]
    m = _native(spec, ["matmul_precision"])
    assert _settings(m) == {}
    x = _batches(spec, 1, 3)[0][0]
    np.testing.assert_array_equal(m.predict(x), _model(spec).predict(x))


def test_full_native_mode_lists_every_difference():
    spec = _spec("all", (6, 6, 2), [Conv2D(3, (3, 3), "tanh", "same", strides=(2, 2)), LayerNorm(),
                                    AveragePooling2D(3, 1, "same"), Flatten(), Dense(3, "softmax")],
                 loss=Loss("sparse_categorical_crossentropy", "mean", (1.0, 2.0, 3.0), l2=f32(0.001)),
                 optimizer=RMSprop(f32(0.01)), clip=ClipNorm(f32(1.0), "per_tensor"), schedule=_DECAY)
    m = tb.Model(spec, init_weights(spec, 0), BuildOptions(dtype="float64", mode="native"))
    assert set(_settings(m)) == {"conv_same_padding", "layernorm_epsilon", "avgpool_count_pad",
                                 "sparse_cce_probabilities", "class_weight_denominator", "l2_regularization",
                                 "rmsprop_rho", "rmsprop_epsilon", "clip_scope", "clip_epsilon", "lr_schedule"}
    assert len(m.info["native_differences"]) == len(_settings(m))
    assert type(m.torch_opt).__name__ == "RMSprop" and m.info["optimizer"] == "built-in torch.optim.RMSprop"
    xs, ys = _batches(spec, 3, 4)
    assert np.isfinite(m.train_steps(xs, ys)).all()


# the keys torch has no default of its own for (another framework's), and a probe spec for every other one
NOT_TORCH = {"adam_one_minus_beta", "lr_precision"}


def test_an_inactive_key_changes_nothing_bit_for_bit():
    """native_only=[a key that does not touch this spec]: the same numbers as aligned mode, exactly."""
    spec = _spec("many", (6, 6, 2), [Conv2D(3, (3, 3), "tanh", "same", strides=(2, 2)), LayerNorm(),
                                     AveragePooling2D(3, 2, "same"), Flatten(), Dense(3)],
                 optimizer=RMSprop(f32(0.01)), clip=ClipNorm(f32(0.1)))
    xs, ys = _batches(spec, 3, 4)
    aligned = _model(spec)
    want = aligned.train_steps(xs, ys)
    for key in ("adam_epsilon", "adagrad_epsilon", "leaky_relu_slope", "momentum_form", "batchnorm_momentum",
                "mse_broadcast", "lr_schedule", *NOT_TORCH):
        m = _native(spec, [key])
        assert _settings(m) == {}, key
        np.testing.assert_array_equal(m.train_steps(xs, ys), want)
        assert all(np.array_equal(a, b) for a, b in zip(m.get_weights(), aligned.get_weights()))


def test_every_probe_of_the_atlas_runs_with_its_key_alone():
    """Each probe of harness.hazards with only its key native: it runs, and names no other key."""
    hazards = pytest.importorskip("harness.hazards")
    seen = set()
    for p in hazards.PROBES:
        m = tb.Model(p.spec, init_weights(p.spec, 0), BuildOptions(dtype=p.dtype, mode="native",
                                                                    extra={"native_only": [p.key]}))
        assert set(_settings(m)) <= {p.key}, (p.name, _settings(m))
        seen |= set(_settings(m))
        xs, ys = _batches(p.spec, 2, 4)
        assert np.isfinite(m.train_steps(xs, ys.astype(np.int64) if p.spec.loss.integer_labels else ys)).all()
    assert seen >= set(NATIVE_KEYS) - NOT_TORCH - {"matmul_precision", "momentum_form", "rmsprop_accumulator",
                                                  "adamw_decay_form", "clip_scope", "gelu_approximation",
                                                  "dropout_rng"}


@pytest.mark.parametrize("name,built_in", [("rmsprop_outside", None), ("adagrad_outside", None),
                                           ("sgd_accumulator_schedule", None), ("sgd_plain_schedule", None),
                                           ("adamw_times_lr_eps_v_hat", None), ("clip_per_tensor_mixed", "SGD")])
def test_cuda_graph_mode_uses_the_hand_written_updates(name, built_in):
    """CUDA-graph fast mode captures the hand-written updates (lr in a device tensor), which the "manual" runs above
    check against the oracle; only plain SGD without a schedule keeps its built-in.  The choice is made on the host,
    so it is checked here on a CPU model told it captures (no GPU in this suite)."""
    spec = _opt_spec(name)
    m = _model(spec)
    m.fast_graph, m.torch_opt, info = True, None, {}
    tb.OPTIMIZER_BUILDERS[type(spec.optimizer)](m, spec.optimizer, info)
    assert (type(m.torch_opt).__name__ if m.torch_opt is not None else None) == built_in, info
    if built_in is None:
        assert info["optimizer"].startswith("hand-written") and "CUDA-graph" in info["optimizer"]


def test_cuda_graph_mode_native_adam_is_torch_capturable():
    """Native Adam without a schedule: what a torch user captures, torch.optim.Adam(capturable=True)."""
    spec = _mlp("adam", optimizer=Adam(f32(0.01)))
    m = _native(spec, ["adam_convention"])
    m.fast_graph, m.torch_opt, info = True, None, {}
    tb.OPTIMIZER_BUILDERS[Adam](m, spec.optimizer, info)
    assert m.torch_opt.param_groups[0]["capturable"] is True


@pytest.mark.parametrize("impl", ["auto", "manual"])
def test_aligned_float32_is_close_to_the_oracle(impl):
    """float32 runs of the new layers, loss terms and optimizers (hand-written scalars in float32 tensors)."""
    spec = _spec("f32", (6, 6, 2), [Conv2D(3, (3, 3), "tanh", "same", strides=(2, 2)), LayerNorm(),
                                    AveragePooling2D(2, 1, "same"), Flatten(), Dense(3, "softmax")],
                 loss=Loss("sparse_categorical_crossentropy", "mean", (1.0, 2.0, 0.5), l2=f32(0.01)),
                 optimizer=AdamW(f32(0.01), convention="eps_v_hat"), clip=ClipNorm(f32(0.5)), schedule=_DECAY)
    w = init_weights(spec, 1)
    m = tb.Model(spec, w, BuildOptions(dtype="float32", extra={"optimizer": impl}))
    o = _oracle(spec, w)
    xs, ys = _batches(spec, 4, 4)
    assert scaled_error(m.train_steps(xs, ys), o.train_steps(xs, ys)) < 1e-5
    assert all(a.dtype == np.float32 for a in m.get_weights())
    _assert_close(m.get_weights(), o.get_weights(), "weights", 1e-5)
