"""The NumPy oracle on the hazards vocabulary (issue 13): every new layer, activation and loss against central finite
differences in float64, the optimizers, clipping and the schedule against their closed forms written out here."""

import numpy as np
import pytest

from backends.base import BuildOptions
from backends.numpy_scratch import Model
from models.spec import (
    SGD,
    Activation,
    Adagrad,
    Adam,
    AdamW,
    AveragePooling2D,
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
from tests.test_numpy_oracle import finite_difference_check


def spec_of(input_shape, layers, loss=None, optimizer=None, **kw):
    return ModelSpec("t", "test", input_shape, tuple(layers), loss or Loss("sse", "mean"), optimizer or SGD(0.1),
                     Init(), "toy_431", (1, 2), 1, 0, **kw)


IMAGE_CASES = {
    "conv same stride 2, odd input": [Conv2D(2, (3, 3), "tanh", "same", strides=(2, 2)), Flatten(), Dense(2)],
    "conv same stride 2, even input": [Conv2D(2, (3, 3), "relu", "same", strides=2), Flatten(), Dense(2)],
    "conv valid stride (2, 1), 2x3 kernel": [Conv2D(2, (2, 3), strides=(2, 1)), Flatten(), Dense(2)],
    "conv same stride 1, even kernel": [Conv2D(2, (2, 2), padding="same"), Flatten(), Dense(2)],
    "maxpool 3 stride 2 (overlapping)": [Conv2D(2, (2, 2)), MaxPool2D(3, 2), Flatten(), Dense(2)],
    "avgpool same 3 stride 2": [Conv2D(2, (2, 2)), AveragePooling2D(3, 2, "same"), Flatten(), Dense(2)],
    "avgpool valid 2": [AveragePooling2D(2), Flatten(), Dense(2)],
    "layernorm on channels": [Conv2D(3, (2, 2)), LayerNorm(), Activation("gelu"), Flatten(), Dense(2)],
}


@pytest.mark.parametrize("size", [5, 6])
@pytest.mark.parametrize("case", list(IMAGE_CASES))
def test_image_layers_match_finite_differences(case, size):
    spec = spec_of((size, size, 2), IMAGE_CASES[case])
    assert finite_difference_check(spec, n=3) < 1e-6


@pytest.mark.parametrize("act", [Activation("tanh"), Activation("softmax"), Activation("leaky_relu", f32(0.3)),
                                 Activation("gelu"), Activation("gelu", approximate="tanh")], ids=repr)
def test_activations_match_finite_differences(act):
    spec = spec_of((4,), [Dense(5), act, Dense(3)])
    assert finite_difference_check(spec) < 1e-6


@pytest.mark.parametrize("loss", [Loss("mse", "mean"), Loss("mse", "sum", l2=f32(0.01)),
                                  Loss("sparse_categorical_crossentropy", "mean"),
                                  Loss("sparse_categorical_crossentropy", "sum", class_weights=(1.0, 3.0, 0.5)),
                                  Loss("softmax_crossentropy", "mean", class_weights=(2.0, 1.0, 0.25), l2=f32(0.1))],
                         ids=lambda loss: f"{loss.kind}-{loss.reduction}-{bool(loss.class_weights)}-{loss.l2}")
def test_losses_match_finite_differences(loss):
    last = Dense(3, "softmax") if loss.kind == "sparse_categorical_crossentropy" else Dense(3)
    spec = spec_of((4,), [Dense(5, "tanh"), last], loss)
    assert finite_difference_check(spec) < 1e-6


def test_the_forms_of_the_new_layers():
    """Closed forms at a few points: TF's 'same' split, the average over in-image values, LayerNorm's statistics."""
    x = np.arange(1.0, 26.0).reshape(1, 5, 5, 1)
    pool = Model(spec_of((5, 5, 1), [AveragePooling2D(2, 2, "same"), Flatten(), Dense(1, use_bias=False)]),
                 [np.ones((9, 1))], BuildOptions())
    # 'same' at 5 / stride 2: output 3, total padding 1 at the bottom / right: the last row and column average
    # over in-image values only
    expect = [(1 + 2 + 6 + 7) / 4, (3 + 4 + 8 + 9) / 4, (5 + 10) / 2, (11 + 12 + 16 + 17) / 4, (13 + 14 + 18 + 19) / 4,
              (15 + 20) / 2, (21 + 22) / 2, (23 + 24) / 2, 25.0]
    assert pool.predict(x)[0, 0] == pytest.approx(sum(expect), rel=1e-15)
    act = Activation("gelu")
    g = Model(spec_of((1,), [Dense(1, use_bias=False), act]), [np.ones((1, 1))], BuildOptions())
    from math import erf, sqrt
    assert g.predict(np.array([[1.5]]))[0, 0] == pytest.approx(0.5 * 1.5 * (1 + erf(1.5 / sqrt(2))), rel=1e-15)


def one_param(optimizer, steps_grads, lr_schedule=None, w0=1.0, clip=None):
    """A single weight trained on the loss g*w (gradient g at every w): the optimizer's updates in closed form."""
    spec = ModelSpec("p", "", (1,), (Dense(1, use_bias=False),), Loss("sse", "sum"), optimizer, Init(), "toy_431",
                     (1,), 1, 0, schedule=lr_schedule, clip=clip)
    m = Model(spec, [np.array([[w0]])], BuildOptions())
    out = []
    for g in steps_grads:
        m._apply([np.array([[g]])])
        out.append(m.get_weights()[0][0, 0])
    return out


def test_sgd_momentum_forms_agree_at_constant_lr_and_part_after_a_change():
    drop = StepDecay(2, f32(0.1))
    acc = one_param(SGD(0.1, f32(0.9)), [1.0] * 4, drop)
    vel = one_param(SGD(0.1, f32(0.9), momentum_form="velocity"), [1.0] * 4, drop)
    assert acc[:2] == pytest.approx(vel[:2], abs=1e-15)
    mu = float(f32(0.9))
    b, w = 0.0, 1.0
    for lr in (0.1, 0.1, 0.1 * f32(0.1), 0.1 * f32(0.1)):
        b = mu * b + 1.0
        w -= lr * b
    assert acc[-1] == pytest.approx(w, abs=1e-15) and abs(acc[-1] - 0.649) < 1e-3
    v, w = 0.0, 1.0
    for lr in (0.1, 0.1, 0.1 * f32(0.1), 0.1 * f32(0.1)):
        v = mu * v - lr
        w += v
    assert vel[-1] == pytest.approx(w, abs=1e-15) and abs(vel[-1] - 0.356) < 1e-3
    nes = one_param(SGD(0.1, f32(0.9), nesterov=True), [1.0, 1.0])
    assert nes[0] == pytest.approx(1 - 0.1 * (1 + mu), abs=1e-15)


def test_rmsprop_adagrad_adamw_first_updates():
    g, lr = 0.1, f32(1e-3)
    keras = one_param(RMSprop(lr), [g])[0] - 1
    assert keras == pytest.approx(-lr * g / np.sqrt((1 - f32(0.9)) * g * g + f32(1e-7)), rel=1e-12)
    torch = one_param(RMSprop(lr, f32(0.99), f32(1e-8), False), [g])[0] - 1
    tf1 = one_param(RMSprop(lr, f32(0.9), f32(1e-10), True, 1.0), [g])[0] - 1
    assert [f"{u:.3g}" for u in (keras, torch, tf1)] == ["-0.00316", "-0.01", "-0.000105"]
    lr = f32(1e-2)
    assert f"{one_param(Adagrad(lr), [g])[0] - 1:.2g}" == "-0.003"
    assert f"{one_param(Adagrad(lr, 0.0, f32(1e-10), False), [g])[0] - 1:.2g}" == "-0.01"
    aw = one_param(AdamW(lr, weight_decay=f32(0.01)), [g])[0]
    ad = one_param(Adam(lr), [g])[0]
    assert aw == pytest.approx(ad - lr * f32(0.01) * 1.0, abs=1e-15)
    assert one_param(AdamW(lr, weight_decay=f32(0.01), decay_times_lr=False), [g])[0] == pytest.approx(
        ad - f32(0.01), abs=1e-15)


def test_clipping_scopes_and_the_schedule():
    spec = ModelSpec("c", "", (2,), (Dense(2),), Loss("sse", "sum"), SGD(1.0), Init(), "toy_431", (1,), 1, 0,
                     clip=ClipNorm(1.0, "global"))
    m = Model(spec, [np.zeros((2, 2)), np.zeros(2)], BuildOptions())
    m._apply([np.full((2, 2), 3.0), np.full(2, 4.0)])  # global norm sqrt(36 + 32) > 1
    norm = np.sqrt(36.0 + 32.0)
    assert np.allclose(m.get_weights()[0], -3.0 / norm) and np.allclose(m.get_weights()[1], -4.0 / norm)
    per = Model(spec.with_overrides(clip=ClipNorm(1.0, "per_tensor")), [np.zeros((2, 2)), np.zeros(2)], BuildOptions())
    per._apply([np.full((2, 2), 3.0), np.full(2, 4.0)])
    assert np.allclose(per.get_weights()[0], -0.5) and np.allclose(per.get_weights()[1], -1 / np.sqrt(2))
    assert [spec.with_overrides(schedule=StepDecay(3, 0.5)).lr_at(t) for t in range(7)] == [1, 1, 1, .5, .5, .5, .25]
