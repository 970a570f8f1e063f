"""Plain TF1 training loop (graph, placeholders, ``Session``, ``feed_dict``) of the MNIST MLP or CNN, timed like the
harness.

    python benchmarks/plain/tf1_loop.py --model mnist_cnn --batch-size 100

What a TF1 tutorial writes: ``tf.compat.v1.disable_eager_execution()``, placeholders, ``tf.Variable`` weights, raw
``tf.nn`` ops, ``sparse_softmax_cross_entropy_with_logits``, ``AdamOptimizer(...).minimize(loss)`` (its kernel is the
eps-hat form) and ``_, c = sess.run([train_op, loss], feed_dict=...)`` per step.  In TF1 in-memory batches are fed as
NumPy arrays through ``feed_dict``: ``--feed tensor`` and ``--feed numpy`` are the same thing here.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402
from _protocol import BETA1, BETA2, EPS, LR, parse_args, run  # noqa: E402

v1 = tf.compat.v1


def build(model, dtype, weights):
    x = v1.placeholder(dtype, [None, 784] if model == "mnist_mlp" else [None, 28, 28, 1])
    y = v1.placeholder(tf.int64, [None])
    if weights is not None:  # given initial weights (canonical layout = TensorFlow's)
        p = [tf.Variable(a.astype(dtype.as_numpy_dtype)) for a in weights]
    elif model == "mnist_mlp":  # the TF1 tutorial: tf.random_normal weights and biases
        p = [tf.Variable(tf.random.normal(s, dtype=dtype)) for s in ([784, 256], [256], [256, 256], [256], [256, 10], [10])]
    else:
        glorot = v1.glorot_uniform_initializer()
        p = [v for s in ([3, 3, 1, 32], [3, 3, 32, 64], [1600, 128], [128, 10])
             for v in (tf.Variable(glorot(s, dtype=dtype)), tf.Variable(tf.zeros(s[-1:], dtype)))]
    if model == "mnist_mlp":
        h1 = tf.nn.relu(tf.matmul(x, p[0]) + p[1])
        h2 = tf.nn.relu(tf.matmul(h1, p[2]) + p[3])
        logits = tf.matmul(h2, p[4]) + p[5]
    else:
        c1 = tf.nn.max_pool2d(tf.nn.relu(tf.nn.conv2d(x, p[0], 1, "VALID") + p[1]), 2, 2, "VALID")  # (N,13,13,32)
        c2 = tf.nn.max_pool2d(tf.nn.relu(tf.nn.conv2d(c1, p[2], 1, "VALID") + p[3]), 2, 2, "VALID")  # (N,5,5,64)
        d1 = tf.nn.relu(tf.matmul(tf.reshape(c2, [-1, 1600]), p[4]) + p[5])
        logits = tf.matmul(d1, p[6]) + p[7]
    loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits))
    # float64: hyperparameters as float64 tensors (Python floats would make the optimizer's state float32)
    hp = (lambda a: tf.constant(a, tf.float64)) if dtype == tf.float64 else (lambda a: a)
    opt = v1.train.AdamOptimizer(learning_rate=hp(LR), beta1=hp(BETA1), beta2=hp(BETA2), epsilon=hp(EPS[model]))
    return x, y, loss, opt.minimize(loss)


def setup(args, xs, ys, weights):
    v1.disable_eager_execution()
    v1.set_random_seed(args.seed)
    x, y, loss, train_op = build(args.model, tf.as_dtype(args.dtype), weights)
    config = v1.ConfigProto()
    if args.threads:
        config.intra_op_parallelism_threads = args.threads
        config.inter_op_parallelism_threads = args.threads
    sess = v1.Session(config=config)
    sess.run(v1.global_variables_initializer())

    def run_round():
        out = []
        for k in range(len(xs)):
            _, c = sess.run([train_op, loss], feed_dict={x: xs[k], y: ys[k]})
            out.append(c)
        return out

    # sess.run returns when the step is done and its loss fetched: no other sync needed
    return run_round, lambda: None, lambda: {"version": tf.__version__}


def main() -> None:
    run("tf1", parse_args("tf1"), setup)


if __name__ == "__main__":
    main()
