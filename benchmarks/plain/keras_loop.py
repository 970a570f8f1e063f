"""Plain Keras 3 training loop (``Sequential``, ``compile``, ``train_on_batch``) of the MNIST MLP or CNN, timed like
the harness, on the Keras backend named by ``KERAS_BACKEND`` (tensorflow, jax or torch; read before Keras loads).

    KERAS_BACKEND=jax python benchmarks/plain/keras_loop.py --model mnist_mlp --batch-size 100

What the Keras examples write: a ``Sequential`` model, ``Adam`` (Keras' Adam is the eps-hat form) and
``SparseCategoricalCrossentropy(from_logits=True)`` passed to ``compile`` (``jit_compile`` left at "auto", as the
harness's ``keras`` backend leaves it), then ``model.train_on_batch(x, y)`` per batch, which returns the step's loss
as a Python float (so every step ends with a host sync, in this loop and in the harness alike).  The batches are
backend tensors (``keras.ops.convert_to_tensor``) made before timing; ``--feed numpy`` passes the NumPy arrays.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
if os.environ["KERAS_BACKEND"] == "jax" and "float64" in sys.argv:  # JAX reads x64 when it is imported
    os.environ.setdefault("JAX_ENABLE_X64", "1")

import keras  # noqa: E402
from _protocol import BETA1, BETA2, EPS, LR, parse_args, run  # noqa: E402

BACKEND = keras.backend.backend()


def build(model):
    layers = keras.layers
    if model == "mnist_mlp":
        return keras.Sequential([keras.Input((784,)), layers.Dense(256, activation="relu"),
                                 layers.Dense(256, activation="relu"), layers.Dense(10)])
    return keras.Sequential([keras.Input((28, 28, 1)),
                             layers.Conv2D(32, (3, 3), activation="relu"), layers.MaxPooling2D((2, 2)),
                             layers.Conv2D(64, (3, 3), activation="relu"), layers.MaxPooling2D((2, 2)),
                             layers.Flatten(), layers.Dense(128, activation="relu"), layers.Dense(10)])


def set_threads(n):
    if BACKEND == "tensorflow":
        import tensorflow as tf

        th = tf.config.threading
        if th.get_intra_op_parallelism_threads() != n or th.get_inter_op_parallelism_threads() != n:
            th.set_intra_op_parallelism_threads(n)
            th.set_inter_op_parallelism_threads(n)
    elif BACKEND == "torch":
        import torch

        torch.set_num_threads(n)
    # jax: XLA's thread pool is fixed at start-up (the environment decides, as in the harness)


def sync(model):
    if BACKEND == "jax":
        for w in model.trainable_variables:
            w.value.block_until_ready()
    elif BACKEND == "torch":
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()


NAME = {"tensorflow": "keras", "jax": "keras-jax", "torch": "keras-torch"}[BACKEND]


def setup(args, xs, ys, weights):
    if args.threads:
        set_threads(args.threads)
    if args.dtype == "float64":
        keras.config.set_floatx("float64")
        keras.config.set_dtype_policy("float64")
    keras.utils.set_random_seed(args.seed)
    model = build(args.model)
    if weights is not None:  # canonical layout = Keras' (channels_last)
        model.set_weights([w.astype(args.dtype) for w in weights])
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=LR, beta_1=BETA1, beta_2=BETA2,
                                                  epsilon=EPS[args.model]),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    if args.feed == "tensor":
        batches = [(keras.ops.convert_to_tensor(xs[k]), keras.ops.convert_to_tensor(ys[k])) for k in range(len(xs))]
    else:
        batches = list(zip(xs, ys))

    def run_round():
        return [model.train_on_batch(x, y) for x, y in batches]

    return run_round, lambda: sync(model), lambda: {"version": f"{keras.__version__} ({BACKEND})",
                                                    "jit_compile": bool(model.jit_compile)}


def main() -> None:
    run(NAME, parse_args(f"keras ({BACKEND})"), setup)


if __name__ == "__main__":
    main()
