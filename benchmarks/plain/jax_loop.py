"""Plain JAX training loop (pure functions, the whole step under ``jax.jit``) of the MNIST MLP or CNN, timed like the
harness.

    python benchmarks/plain/jax_loop.py --model mnist_mlp --batch-size 1

What a JAX tutorial writes: parameters as a list of arrays, ``jax.value_and_grad`` of the loss, Adam written out
inside the jitted step (eps-hat, the step counter kept on the device with the moments), new parameters returned.
The batches are device arrays (``jax.device_put``) made before timing (``--feed numpy``: ``device_put`` in the step);
the losses stay on the device until the end of the round, and ``block_until_ready`` is the sync before each clock
read (JAX dispatch is asynchronous).  float64 turns on ``jax_enable_x64`` before anything is created.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from _protocol import BETA1, BETA2, EPS, LR, parse_args, run
from jax import lax


def init_params(model, key, dtype):
    keys = jax.random.split(key, 8)
    if model == "mnist_mlp":  # normal(0, 1) weights and biases, as the TF1 tutorial this model comes from
        shapes = [(784, 256), (256,), (256, 256), (256,), (256, 10), (10,)]
        return [jax.random.normal(k, s, dtype) for k, s in zip(keys, shapes)]
    glorot = jax.nn.initializers.glorot_uniform()
    shapes = [(3, 3, 1, 32), (3, 3, 32, 64), (1600, 128), (128, 10)]
    return [a for k, s in zip(keys, shapes) for a in (glorot(k, s, dtype), jnp.zeros(s[-1:], dtype))]


def forward(p, x):
    if len(p) == 6:
        h = jax.nn.relu(x @ p[0] + p[1])
        h = jax.nn.relu(h @ p[2] + p[3])
        return h @ p[4] + p[5]

    def conv_relu_pool(h, w, b):
        h = lax.conv_general_dilated(h, w, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        h = jax.nn.relu(h + b)
        return lax.reduce_window(h, -jnp.inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")

    h = conv_relu_pool(x, p[0], p[1])  # (N,13,13,32)
    h = conv_relu_pool(h, p[2], p[3])  # (N,5,5,64)
    h = jax.nn.relu(h.reshape(h.shape[0], -1) @ p[4] + p[5])
    return h @ p[6] + p[7]


def loss_fn(p, x, y):
    logp = jax.nn.log_softmax(forward(p, x))
    return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))


def make_step(eps):
    @jax.jit
    def train_step(params, m, v, t, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        t = t + 1
        alpha = LR * jnp.sqrt(1 - BETA2**t) / (1 - BETA1**t)
        m = [mi + (g - mi) * (1 - BETA1) for mi, g in zip(m, grads)]
        v = [vi + (g * g - vi) * (1 - BETA2) for vi, g in zip(v, grads)]
        params = [p - alpha * mi / (jnp.sqrt(vi) + eps) for p, mi, vi in zip(params, m, v)]
        return params, m, v, t, loss

    return train_step


def setup(args, xs, ys, weights):
    if args.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    ys = ys.astype(np.int32)  # JAX's default integer
    dtype = jnp.dtype(args.dtype)
    if weights is None:
        params = init_params(args.model, jax.random.PRNGKey(args.seed), dtype)
    else:  # canonical layout, as lax.conv_general_dilated is told (NHWC, HWIO)
        params = [jnp.asarray(w, dtype) for w in weights]
    m = [jnp.zeros_like(p) for p in params]
    v = [jnp.zeros_like(p) for p in params]
    t = jnp.zeros((), dtype)
    train_step = make_step(EPS[args.model])
    if args.feed == "tensor":
        batches = [(jax.device_put(xs[k]), jax.device_put(ys[k])) for k in range(len(xs))]
    else:
        batches = None

    def run_round():
        nonlocal params, m, v, t
        losses = []
        for k in range(len(xs)):
            x, y = batches[k] if batches else (jax.device_put(xs[k]), jax.device_put(ys[k]))
            params, m, v, t, loss = train_step(params, m, v, t, x, y)
            losses.append(loss)
        return np.asarray(jnp.stack(losses))

    return run_round, lambda: jax.block_until_ready(params), lambda: {"version": jax.__version__,
                                                                      "device": str(jax.devices()[0])}


def main() -> None:
    run("jax", parse_args("jax"), setup)


if __name__ == "__main__":
    main()
