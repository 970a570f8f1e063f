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
        Dense(3, "swish")


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


# ------------------------------------------------------------------------------------------------- the open vocabulary
@pytest.mark.parametrize("name", list(MODELS))
def test_spec_json_round_trip(name):
    import json

    from models import spec_from_dict, spec_to_dict

    spec = MODELS[name]
    again = spec_from_dict(json.loads(json.dumps(spec_to_dict(spec))))
    assert again == spec and again.param_names() == spec.param_names()


def test_spec_from_dict_refuses_unknown_types_and_fields():
    from models import spec_from_dict, spec_to_dict

    d = spec_to_dict(MODELS["mlp_431"])
    with pytest.raises(ValueError, match="unknown layer type 'Lstm'"):
        spec_from_dict({**d, "layers": [{"type": "Lstm", "units": 3}]})
    with pytest.raises(ValueError, match="Dense has no field"):
        spec_from_dict({**d, "layers": [{"type": "Dense", "units": 3, "kernel_regularizer": 0.1}]})


def test_parameter_roles_not_shapes_decide_initial_values():
    from models import Activation, BatchNorm, init_state

    spec = ModelSpec("bn", "", (4,), (Dense(3, use_bias=False), BatchNorm(), Activation("relu"), Dense(1)),
                     Loss("sse", "sum"), Adam(), Init("normal", "normal", 1.0), "toy_431", (2,), 1, 0)
    assert spec.param_names() == ["dense0/kernel", "bn1/gamma", "bn1/beta", "dense3/kernel", "dense3/bias"]
    assert spec.state_names() == ["bn1/moving_mean", "bn1/moving_variance"]
    roles = [p.role for _, _, p in spec.param_entries()]
    assert roles == ["kernel", "gamma", "beta", "kernel", "bias"]
    w = init_weights(spec, 0)
    assert np.all(w[1] == 1) and np.all(w[2] == 0)  # gamma ones, beta zeros: 1-D but no bias
    assert np.std(w[4]) >= 0 and w[4].shape == (1,)  # the bias follows Init.biases ("normal")
    mean, var = init_state(spec)
    assert np.all(mean == 0) and np.all(var == 1)
    assert spec.couples_batch == [1]


def test_batchnorm_and_dropout_validate_their_fields():
    from models import BatchNorm, Dropout

    with pytest.raises(ValueError, match="float32"):
        BatchNorm(momentum=0.99)
    with pytest.raises(ValueError, match="rate"):
        Dropout(1.0)
    with pytest.raises(ValueError, match="at least 2"):
        ModelSpec("b", "", (4,), (Dense(3), BatchNorm(), Dense(1)), Loss("sse", "sum"), Adam(), Init(), "toy_431",
                  (1, 3), 1, 0)


MODEL_FILE = """
from models.spec import Adam, Dense, Init, Loss, ModelSpec
SPEC = ModelSpec(name="mine", description="d", input_shape=(4,), layers=(Dense(2, "relu"), Dense(1)),
                 loss=Loss("sse", "sum"), optimizer=Adam(), init=Init(), dataset="toy_431", batch_sizes=(1, 3),
                 epochs=1, expected_params={n})
"""


def test_a_users_model_file_is_loaded_and_validated(tmp_path):
    good = tmp_path / "net.py"
    good.write_text(MODEL_FILE.format(n=4 * 2 + 2 + 2 + 1))
    assert get_model(str(good)).name == "mine"
    wrong = tmp_path / "wrong.py"
    wrong.write_text(MODEL_FILE.format(n=12))
    with pytest.raises(ValueError, match="13 trainable parameters but says expected_params=12"):
        get_model(str(wrong))
    broken = tmp_path / "broken.py"
    broken.write_text("from models.spec import Dense\nSPEC = Dense(3, 'tanhh')\n")
    with pytest.raises(ValueError, match=r"(?s)broken.py.*failed to load: ValueError: Dense activation 'tanhh'.*line 2"):
        get_model(str(broken))
    syntax = tmp_path / "syntax.py"
    syntax.write_text("SPEC = (\n")
    with pytest.raises(ValueError, match="SyntaxError"):
        get_model(str(syntax))
    empty = tmp_path / "empty.py"
    empty.write_text("x = 1\n")
    with pytest.raises(ValueError, match="defines 0 ModelSpec objects and no SPEC"):
        get_model(str(empty))
    with pytest.raises(ValueError, match="does not exist"):
        get_model(str(tmp_path / "nothing.py"))


def test_the_example_model_file_loads():
    from pathlib import Path

    spec = get_model(str(Path(__file__).resolve().parent.parent / "examples" / "my_model.py"))
    assert spec.param_count() == spec.expected_params and spec.state_names()
