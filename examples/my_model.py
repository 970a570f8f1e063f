"""A model of your own: the Pima MLP with BatchNorm and dropout.

Compare it on every installed backend with

    harness compare --model examples/my_model.py

The file only has to define ``SPEC``, a :class:`models.spec.ModelSpec` (plain data: the harness validates it as it
validates the built-in models and sends it to every backend's worker as JSON).  Every layer, loss and optimizer of the
spec vocabulary is listed in ``models/spec.py`` (``LAYERS``, ``OPTIMIZERS``); CONTRIBUTING.md says how to add one.
"""

from models.spec import Activation, Adam, BatchNorm, Dense, Dropout, Init, Loss, ModelSpec, f32

SPEC = ModelSpec(
    name="my_pima_bn",
    description="Pima MLP 8-16-1 with BatchNorm and dropout 0.2, binary cross-entropy, Adam",
    input_shape=(8,),
    layers=(
        Dense(16, use_bias=False),  # BatchNorm's beta takes the bias's place
        BatchNorm(momentum=f32(0.9), epsilon=f32(1e-5), unbiased_moving_variance=True),  # torch's BatchNorm1d defaults
        Activation("relu"),
        Dropout(0.2),
        Dense(1),  # logits: the sigmoid is folded into the loss
    ),
    loss=Loss("binary_crossentropy", "mean"),
    optimizer=Adam(lr=f32(0.001), epsilon=f32(1e-7)),
    init=Init("glorot_uniform", "zeros"),
    dataset="pima",
    batch_sizes=(4, 16),  # BatchNorm on flat features needs at least 2 samples per batch
    epochs=50,
    expected_params=8 * 16 + 16 * 2 + 16 + 1,  # kernel, gamma and beta, output kernel and bias
)
