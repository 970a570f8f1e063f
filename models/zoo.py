"""The four built-in models, as the tutorials the user started from define them."""

from __future__ import annotations

from .spec import SGD, Adam, Conv2D, Dense, Flatten, Init, Loss, MaxPool2D, ModelSpec, f32

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

MODELS: dict[str, ModelSpec] = {m.name: m for m in (MLP_431, PIMA_MLP, MNIST_MLP, MNIST_CNN)}


def get_model(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(MODELS)}") from None
