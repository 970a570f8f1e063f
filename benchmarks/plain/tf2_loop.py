"""Plain TF2 training loop (``tf.Variable`` weights, ``GradientTape``, one ``tf.function`` step) of the MNIST MLP or
CNN, timed like the harness.

    python benchmarks/plain/tf2_loop.py --model mnist_mlp --batch-size 1

What a TF2 "custom training loop" tutorial writes, with Adam written out in the step (eps-hat: the spec's
convention; ``tf.keras.optimizers.Adam`` is a Keras 3 object with its own per-step bookkeeping, which the harness's
``tf2`` backend does not use either).  The batches are ``tf.constant`` tensors made before timing; the step is
traced once (all batches have one shape).  ``--feed numpy`` calls ``tf.constant`` on each NumPy batch in the step.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402
from _protocol import BETA1, BETA2, EPS, LR, parse_args, run  # noqa: E402


def make_params(model, dtype):
    if model == "mnist_mlp":  # normal(0, 1) weights and biases, as the TF1 tutorial this model comes from
        shapes = [(784, 256), (256,), (256, 256), (256,), (256, 10), (10,)]
        return [tf.Variable(tf.random.normal(s, dtype=dtype)) for s in shapes]
    init = tf.keras.initializers.GlorotUniform()
    shapes = [(3, 3, 1, 32), (3, 3, 32, 64), (1600, 128), (128, 10)]
    return [v for s in shapes for v in (tf.Variable(init(s, dtype=dtype)), tf.Variable(tf.zeros(s[-1:], dtype)))]


def forward(model, p, x):
    if model == "mnist_mlp":
        h = tf.nn.relu(x @ p[0] + p[1])
        h = tf.nn.relu(h @ p[2] + p[3])
        return h @ p[4] + p[5]
    h = tf.nn.max_pool2d(tf.nn.relu(tf.nn.conv2d(x, p[0], 1, "VALID") + p[1]), 2, 2, "VALID")
    h = tf.nn.max_pool2d(tf.nn.relu(tf.nn.conv2d(h, p[2], 1, "VALID") + p[3]), 2, 2, "VALID")
    h = tf.nn.relu(tf.reshape(h, [-1, 1600]) @ p[4] + p[5])
    return h @ p[6] + p[7]


def set_threads(n):
    th = tf.config.threading
    if th.get_intra_op_parallelism_threads() != n or th.get_inter_op_parallelism_threads() != n:
        th.set_intra_op_parallelism_threads(n)
        th.set_inter_op_parallelism_threads(n)


def setup(args, xs, ys, weights):
    if args.threads:
        set_threads(args.threads)
    dtype = tf.as_dtype(args.dtype)
    tf.random.set_seed(args.seed)
    if weights is None:
        params = make_params(args.model, dtype)
    else:  # canonical layout = TensorFlow's
        params = [tf.Variable(w.astype(args.dtype)) for w in weights]
    m = [tf.Variable(tf.zeros_like(p)) for p in params]
    v = [tf.Variable(tf.zeros_like(p)) for p in params]
    t = tf.Variable(0.0, dtype=dtype)
    eps = EPS[args.model]

    @tf.function
    def train_step(x, y):
        with tf.GradientTape() as tape:
            logits = forward(args.model, params, x)
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits))
        grads = tape.gradient(loss, params)
        t.assign_add(1.0)
        alpha = LR * tf.sqrt(1.0 - tf.pow(tf.constant(BETA2, dtype), t)) / (1.0 - tf.pow(tf.constant(BETA1, dtype), t))
        for p, mi, vi, g in zip(params, m, v, grads):
            mi.assign_add((g - mi) * (1.0 - BETA1))
            vi.assign_add((g * g - vi) * (1.0 - BETA2))
            p.assign_sub(alpha * mi / (tf.sqrt(vi) + eps))
        return loss

    if args.feed == "tensor":
        batches = [(tf.constant(xs[k]), tf.constant(ys[k])) for k in range(len(xs))]

        def run_round():
            return tf.stack([train_step(x, y) for x, y in batches]).numpy()  # fetching the losses is the sync
    else:
        def run_round():
            return tf.stack([train_step(tf.constant(xs[k]), tf.constant(ys[k])) for k in range(len(xs))]).numpy()

    return run_round, lambda: None, lambda: {"version": tf.__version__,
                                             "tracing_count": train_step.experimental_get_tracing_count()}


def main() -> None:
    run("tf2", parse_args("tf2"), setup)


if __name__ == "__main__":
    main()
