"""Plain NumPy training loop of the MNIST MLP or CNN, written out by hand, timed like the harness.

    python benchmarks/plain/numpy_loop.py --model mnist_mlp --batch-size 100

MLP 784-256-256-10 (relu, relu, logits) and CNN conv32-pool-conv64-pool-dense128-10, softmax cross-entropy (mean)
from logits, Adam (eps-hat: w -= lr*sqrt(1-b2^t)/(1-b1^t) * m/(sqrt(v)+eps)), updated in place.  Convolution is
im2col (one slice per kernel tap, one matmul); max-pooling routes the gradient to the first maximum of a window.
The gradient of the input (images or pixels) is not computed: nothing needs it.
Prints one JSON line (see ``_protocol.py``).
"""

from __future__ import annotations

import os
import sys

if "--threads" in sys.argv[:-1]:  # BLAS reads its thread count when NumPy is imported: set it first, like the harness
    for _k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[_k] = sys.argv[sys.argv.index("--threads") + 1]

import numpy as np  # noqa: E402
from _protocol import BETA1, BETA2, EPS, adam_alpha, parse_args, run  # noqa: E402


# ------------------------------------------------------------------------------------------------------ layers
def conv_forward(x, w, b):
    """x (N,H,W,C), w (kh,kw,C,F) 'valid' stride 1 -> (N,Ho,Wo,F) and the im2col matrix."""
    n, h, wd, c = x.shape
    kh, kw, _, f = w.shape
    ho, wo = h - kh + 1, wd - kw + 1
    cols = np.stack([x[:, i:i + ho, j:j + wo, :] for i in range(kh) for j in range(kw)], axis=3)
    cols = cols.reshape(n * ho * wo, kh * kw * c)
    return (cols @ w.reshape(-1, f) + b).reshape(n, ho, wo, f), cols


def conv_backward(dz, x_shape, w, cols, need_dx):
    n, h, wd, c = x_shape
    kh, kw, _, f = w.shape
    ho, wo = h - kh + 1, wd - kw + 1
    d2 = dz.reshape(-1, f)
    dw = (cols.T @ d2).reshape(w.shape)
    db = d2.sum(axis=0)
    if not need_dx:
        return None, dw, db
    dcols = (d2 @ w.reshape(-1, f).T).reshape(n, ho, wo, kh * kw, c)
    dx = np.zeros(x_shape, dtype=dz.dtype)
    for t in range(kh * kw):
        i, j = divmod(t, kw)
        dx[:, i:i + ho, j:j + wo, :] += dcols[:, :, :, t, :]
    return dx, dw, db


def pool_forward(x):
    """2x2 max-pool, stride 2, 'valid'; also the position of each window's (first) maximum, for backward."""
    n, h, w, c = x.shape
    ho, wo = h // 2, w // 2
    win = x[:, :ho * 2, :wo * 2, :].reshape(n, ho, 2, wo, 2, c).transpose(0, 1, 3, 5, 2, 4).reshape(n, ho, wo, c, 4)
    idx = win.argmax(axis=-1)
    return np.take_along_axis(win, idx[..., None], axis=-1)[..., 0], idx


def pool_backward(dout, x_shape, idx):
    n, h, w, c = x_shape
    ho, wo = h // 2, w // 2
    dwin = np.zeros(dout.shape + (4,), dtype=dout.dtype)
    np.put_along_axis(dwin, idx[..., None], dout[..., None], axis=-1)
    dx = np.zeros(x_shape, dtype=dout.dtype)
    dx[:, :ho * 2, :wo * 2, :] = dwin.reshape(n, ho, wo, c, 2, 2).transpose(0, 1, 4, 2, 5, 3).reshape(n, ho * 2, wo * 2, c)
    return dx


def softmax_ce(logits, y):
    """Mean cross-entropy from logits and its gradient w.r.t. the logits."""
    n = len(y)
    z = logits - logits.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    loss = -logp[np.arange(n), y].mean()
    g = np.exp(logp)
    g[np.arange(n), y] -= 1
    return loss, g / n


# ------------------------------------------------------------------------------------------------------ models
def init_params(model, dtype, rng):
    def glorot(shape):
        fan_in = int(np.prod(shape[:-1]))
        fan_out = shape[-1] * (int(np.prod(shape[:-2])) if len(shape) == 4 else 1)
        lim = np.sqrt(6.0 / (fan_in + fan_out))
        return rng.uniform(-lim, lim, shape).astype(dtype)

    if model == "mnist_mlp":  # the TF1 tutorial's init: normal(0, 1) weights and biases
        sizes = (784, 256, 256, 10)
        return [a.astype(dtype) for i, o in zip(sizes[:-1], sizes[1:])
                for a in (rng.normal(0.0, 1.0, (i, o)), rng.normal(0.0, 1.0, (o,)))]
    shapes = [(3, 3, 1, 32), (3, 3, 32, 64), (1600, 128), (128, 10)]
    return [p for s in shapes for p in (glorot(s), np.zeros(s[-1], dtype))]


def mlp_loss_grads(p, x, y):
    w1, b1, w2, b2, w3, b3 = p
    z1 = x @ w1 + b1
    h1 = np.maximum(z1, 0)
    z2 = h1 @ w2 + b2
    h2 = np.maximum(z2, 0)
    loss, d3 = softmax_ce(h2 @ w3 + b3, y)
    d2 = (d3 @ w3.T) * (z2 > 0)
    d1 = (d2 @ w2.T) * (z1 > 0)
    return loss, [x.T @ d1, d1.sum(0), h1.T @ d2, d2.sum(0), h2.T @ d3, d3.sum(0)]


def cnn_loss_grads(p, x, y):
    k1, c1, k2, c2, w3, b3, w4, b4 = p
    z1, cols1 = conv_forward(x, k1, c1)  # (N,26,26,32)
    a1 = np.maximum(z1, 0)
    p1, m1 = pool_forward(a1)  # (N,13,13,32)
    z2, cols2 = conv_forward(p1, k2, c2)  # (N,11,11,64)
    a2 = np.maximum(z2, 0)
    p2, m2 = pool_forward(a2)  # (N,5,5,64)
    f = p2.reshape(len(x), -1)  # (N,1600), (h, w, c) order
    z3 = f @ w3 + b3
    h3 = np.maximum(z3, 0)
    loss, d4 = softmax_ce(h3 @ w4 + b4, y)
    d3 = (d4 @ w4.T) * (z3 > 0)
    df = (d3 @ w3.T).reshape(p2.shape)
    da2 = pool_backward(df, a2.shape, m2) * (z2 > 0)
    dp1, dk2, dc2 = conv_backward(da2, p1.shape, k2, cols2, need_dx=True)
    da1 = pool_backward(dp1, a1.shape, m1) * (z1 > 0)
    _, dk1, dc1 = conv_backward(da1, x.shape, k1, cols1, need_dx=False)
    return loss, [dk1, dc1, dk2, dc2, f.T @ d3, d3.sum(0), h3.T @ d4, d4.sum(0)]


# ------------------------------------------------------------------------------------------------------ the loop
def setup(args, xs, ys, weights):
    """(run_round, sync, info) of the loop; NumPy arrays are NumPy's tensors: --feed changes nothing here."""
    if weights is None:
        params = init_params(args.model, args.dtype, np.random.default_rng(args.seed + 1))
    else:
        params = [w.astype(args.dtype) for w in weights]
    m = [np.zeros_like(q) for q in params]
    v = [np.zeros_like(q) for q in params]
    loss_grads = mlp_loss_grads if args.model == "mnist_mlp" else cnn_loss_grads
    # hyperparameters as scalars of the run's dtype: a Python float in `array + eps` costs NumPy 2 a casting loop
    # (measured: sqrt(v) + 1e-8 took 490 us with a Python float, 110 us with a float32 scalar, on W1's 200k elements)
    f = np.dtype(args.dtype).type
    eps, c1, c2 = f(EPS[args.model]), f(1 - BETA1), f(1 - BETA2)
    t = 0

    def train_step(x, y):
        nonlocal t
        t += 1
        loss, grads = loss_grads(params, x, y)
        alpha = f(adam_alpha(t))
        for w, mi, vi, g in zip(params, m, v, grads):
            mi += (g - mi) * c1
            vi += (g * g - vi) * c2
            w -= (mi * alpha) / (np.sqrt(vi) + eps)
        return loss

    def run_round():
        return [float(train_step(xs[k], ys[k])) for k in range(len(xs))]

    return run_round, lambda: None, lambda: {"version": np.__version__}


def main() -> None:
    run("numpy", parse_args("numpy"), setup)


if __name__ == "__main__":
    main()
