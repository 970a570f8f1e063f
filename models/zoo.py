"""The built-in models, as the tutorials the user started from define them, and users' own model files."""

from __future__ import annotations

import importlib.util
import traceback
from pathlib import Path

from .spec import (
    LAYERS,
    SGD,
    Activation,
    Adam,
    BatchNorm,
    Conv2D,
    Dense,
    Dropout,
    Flatten,
    Init,
    Loss,
    MaxPool2D,
    ModelSpec,
    f32,
)

MLP_431 = ModelSpec(
    name="mlp_431",
    description="4-3-1 sigmoid MLP on a 3-sample toy set, sum of squared errors, plain gradient descent",
    input_shape=(4,),
    layers=(Dense(3, "sigmoid"), Dense(1, "sigmoid")),
    loss=Loss("sse", "sum"),  # sum over the batch of (y_pred - y)^2, no 1/2
    optimizer=SGD(lr=0.1),
    init=Init("glorot_uniform", "zeros"),
    dataset="toy_431",
    batch_sizes=(1, 3),  # one update per sample in fixed order; full batch
    epochs=2000,
    expected_params=19,
    dtype="float64",
    shuffle=False,
    reference="the tutorial's net learns y = [1, 1, 0] from X = [[1,0,1,0],[1,0,1,1],[0,1,0,1]]",
)

PERCEPTRON_OR = ModelSpec(
    name="perceptron_or",
    description="the TF1 tutorial's perceptron: relu(x @ w), no bias, on the OR gate, sum of squares, gradient descent",
    input_shape=(3,),
    layers=(Dense(1, "relu", use_bias=False),),
    loss=Loss("sse", "sum"),  # tf.reduce_sum(tf.square(y - output))
    optimizer=SGD(lr=0.01),
    # tf.random_normal([3, 1], seed=15) under TF1 graph mode (a graph without a graph-level seed), as that initializer
    # draws it on this machine: the tutorial's own numbers, so that its printed losses can be reproduced
    init=Init(explicit=((0.7045772, 0.12742124, 1.059515),)),
    dataset="or_gate",
    batch_sizes=(1, 4),  # the tutorial trains full batch (4)
    epochs=100,
    expected_params=3,
    dtype="float32",
    shuffle=False,
    reference="the tutorial prints the loss after each of 100 full-batch updates: it starts at 2.07 and ends at 0.27",
)

PIMA_MLP = ModelSpec(
    name="pima_mlp",
    description="Pima diabetes MLP 8-16-8-1 (relu, relu, sigmoid), binary cross-entropy, Adam",
    input_shape=(8,),
    layers=(Dense(16, "relu"), Dense(8, "relu"), Dense(1)),  # sigmoid folded into the loss
    loss=Loss("binary_crossentropy", "mean"),
    optimizer=Adam(lr=f32(0.001), epsilon=f32(1e-7)),  # Keras' Adam defaults
    init=Init("uniform", "zeros", 0.05),  # Keras 1 init='uniform': U(-0.05, 0.05) kernels, zero biases
    dataset="pima",
    batch_sizes=(1, 10),
    epochs=150,
    expected_params=289,
    reference="the Keras tutorial reports 77.7% training accuracy (unscaled features)",
)

MNIST_MLP = ModelSpec(
    name="mnist_mlp",
    description="MNIST MLP 784-256-256-10 (relu, relu, logits), softmax cross-entropy, Adam",
    input_shape=(784,),
    layers=(Dense(256, "relu"), Dense(256, "relu"), Dense(10)),
    loss=Loss("softmax_crossentropy", "mean"),
    optimizer=Adam(lr=f32(0.001), epsilon=f32(1e-8)),  # tf.compat.v1.train.AdamOptimizer defaults
    init=Init("normal", "normal", 1.0),  # the original TF1 code: tf.random_normal for weights and biases
    dataset="mnist",
    batch_sizes=(1, 100),
    epochs=15,
    expected_params=269_322,
    reference="the TF1 tutorial trains 15 epochs at batch 100",
)

MNIST_CNN = ModelSpec(
    name="mnist_cnn",
    description="MNIST CNN conv32-pool-conv64-pool-dense128-10, softmax cross-entropy, Adam",
    input_shape=(28, 28, 1),
    layers=(
        Conv2D(32, (3, 3), "relu"),
        MaxPool2D(2),
        Conv2D(64, (3, 3), "relu"),
        MaxPool2D(2),
        Flatten(),  # 5*5*64 = 1600, (h, w, c) order
        Dense(128, "relu"),
        Dense(10),
    ),
    loss=Loss("softmax_crossentropy", "mean"),
    optimizer=Adam(lr=f32(0.001), epsilon=f32(1e-7)),  # Keras' Adam defaults
    init=Init("glorot_uniform", "zeros"),
    dataset="mnist",  # images reshaped to input_shape by the harness
    batch_sizes=(1, 100),
    epochs=12,
    expected_params=225_034,
    reference="the Keras mnist_cnn example",
)

MNIST_BN_CNN = ModelSpec(
    name="mnist_bn_cnn",
    description="MNIST CNN (conv32-BN-relu-pool, conv64-BN-relu-pool, dropout 0.5, dense 10), softmax "
                "cross-entropy, Adam",
    input_shape=(28, 28, 1),
    layers=(
        Conv2D(32, (3, 3), use_bias=False),  # a bias before BatchNorm is cancelled by its mean: the tutorials drop it
        BatchNorm(),  # Keras' defaults, written out: momentum 0.99 (weight of the old value), epsilon 1e-3, biased
        Activation("relu"),
        MaxPool2D(2),
        Conv2D(64, (3, 3), use_bias=False),
        BatchNorm(),
        Activation("relu"),
        MaxPool2D(2),
        Flatten(),  # 5*5*64 = 1600
        Dropout(0.5),
        Dense(10),
    ),
    loss=Loss("softmax_crossentropy", "mean"),
    optimizer=Adam(lr=f32(0.001), epsilon=f32(1e-7)),  # Keras' Adam defaults
    init=Init("glorot_uniform", "zeros"),
    dataset="mnist",
    batch_sizes=(1, 100),
    epochs=12,
    expected_params=34_922,
    reference="the Keras and PyTorch MNIST tutorials' CNN with BatchNorm and dropout",
)

MODELS: dict[str, ModelSpec] = {m.name: m for m in (MLP_431, PERCEPTRON_OR, PIMA_MLP, MNIST_MLP, MNIST_CNN, MNIST_BN_CNN)}


def is_model_file(name: str) -> bool:
    return name.endswith(".py") or "/" in name or "\\" in name


def load_model_file(path: str | Path) -> ModelSpec:
    """The spec a user's Python file defines: a module-level ``SPEC`` (or its one ``ModelSpec``), validated like the
    built-in ones; ValueError with the file's own traceback lines for anything wrong."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"model file {str(path)!r} does not exist; give a built-in model ({', '.join(MODELS)}) or "
                         f"the path of a Python file that defines SPEC = ModelSpec(...)")
    name = f"dlcompare_user_model_{abs(hash(str(path.resolve())))}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:
        frames = [f for f in traceback.extract_tb(e.__traceback__) if Path(f.filename).resolve() == path.resolve()]
        where = "".join(traceback.format_list(frames)) if frames else ""
        if isinstance(e, SyntaxError):
            where = f'  File "{e.filename}", line {e.lineno}\n    {(e.text or "").strip()}\n'
        raise ValueError(f"model file {str(path)!r} failed to load: {type(e).__name__}: {e}\n{where}"
                         f"fix the file and run again") from None
    specs = [v for v in vars(module).values() if isinstance(v, ModelSpec)]
    spec = getattr(module, "SPEC", None)
    if spec is None:
        if len(specs) != 1:
            raise ValueError(f"model file {str(path)!r} defines {len(specs)} ModelSpec objects and no SPEC; "
                             f"name the one to compare SPEC = ModelSpec(...)")
        spec = specs[0]
    if not isinstance(spec, ModelSpec):
        raise ValueError(f"SPEC in model file {str(path)!r} is a {type(spec).__name__}, expected models.spec.ModelSpec")
    for i, layer in enumerate(spec.layers):
        if LAYERS.get(type(layer).__name__) is not type(layer):
            raise ValueError(f"model file {str(path)!r}: layer {i} is a {type(layer).__name__}, which is not in the "
                             f"spec vocabulary ({', '.join(LAYERS)}); CONTRIBUTING.md says how to add a layer")
    if spec.param_count() != spec.expected_params:
        raise ValueError(f"model file {str(path)!r}: spec {spec.name!r} has {spec.param_count()} trainable parameters "
                         f"but says expected_params={spec.expected_params}; correct expected_params (it guards against "
                         f"a layer that is not the one you meant)")
    return spec


def get_model(name: str) -> ModelSpec:
    """A built-in model by name, or the spec of a user's model file (a path ending in .py)."""
    if name in MODELS:
        return MODELS[name]
    if is_model_file(name):
        return load_model_file(name)
    raise ValueError(f"unknown model {name!r}; valid models: {', '.join(MODELS)}, or the path of a Python file that "
                     f"defines SPEC = ModelSpec(...) (see examples/my_model.py)")
