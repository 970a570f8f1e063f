import dataclasses

import numpy as np
import pytest

from models import MODELS, Adam, Conv2D, Dense, Flatten, Init, Loss, MaxPool2D, ModelSpec, f32, get_model, init_weights


@pytest.mark.parametrize("name", list(MODELS))
def test_expected_parameter_count(name):
    spec = MODELS[name]
    assert spec.param_count() == spec.expected_params
    assert len(spec.param_names()) == len(spec.param_shapes())


def test_hand_counted_parameters():
    assert MODELS["mlp_431"].param_count() == 4 * 3 + 3 + 3 * 1 + 1
    assert MODELS["mnist_cnn"].shapes()[4] == (1600,)  # 5*5*64 after the second pool


def test_specs_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        MODELS["mlp_431"].epochs = 3


def test_unknown_model_lists_valid_names():
    with pytest.raises(ValueError, match="mlp_431"):
        get_model("resnet")


def test_invalid_layer_sequence_is_explained():
    with pytest.raises(ValueError, match="Flatten"):
        ModelSpec("bad", "", (4, 4, 1), (Dense(3),), Loss("sse", "sum"), Adam(), Init(), "toy_431", (1,), 1, 0)
    with pytest.raises(ValueError, match="activation"):
        Dense(3, "tanh")


def test_adam_hyperparameters_must_be_float32_exact():
    with pytest.raises(ValueError, match="float32"):
        Adam(beta2=0.999)
    assert Adam(beta2=f32(0.999)).beta2 == float(np.float32(0.999))


def test_init_weights_are_canonical_and_seeded():
    spec = MODELS["mnist_cnn"]
    a, b, c = init_weights(spec, 1), init_weights(spec, 1), init_weights(spec, 2)
    assert [w.shape for w in a] == spec.param_shapes()
    assert all(w.dtype == np.float64 for w in a)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], c[0])
    assert spec.param_shapes()[0] == (3, 3, 1, 32)  # HWIO
    # glorot limit for the first conv: sqrt(6 / (9*1 + 9*32))
    assert np.abs(a[0]).max() <= np.sqrt(6 / (9 + 9 * 32))
    assert not np.any(a[1])  # zero biases


def test_tutorial_initializers():
    w = init_weights(MODELS["pima_mlp"], 0)
    assert np.abs(w[0]).max() <= 0.05 and not np.any(w[1])
    w = init_weights(MODELS["mnist_mlp"], 0)
    assert 0.9 < w[0].std() < 1.1 and 0.8 < w[1].std() < 1.2  # normal(0, 1) weights *and* biases


def test_loss_prediction_and_conv_spec():
    assert Loss("binary_crossentropy", "mean").prediction == "sigmoid"
    assert Loss("softmax_crossentropy", "sum").integer_labels
    spec = ModelSpec("c", "", (7, 7, 1), (Conv2D(2), MaxPool2D(2), Flatten(), Dense(1)), Loss("sse", "sum"),
                     Adam(), Init(), "toy_431", (1,), 1, 0)
    assert spec.shapes() == [(5, 5, 2), (2, 2, 2), (8,), (1,)]
