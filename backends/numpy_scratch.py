"""NumPy from scratch: hand-written forward and backward for every layer, activation and loss; the float64 oracle.

Layouts are the canonical ones (dense ``(in, out)``, conv HWIO, NHWC, flatten in (h, w, c) order): no conversion.
Convolution is im2col (one gather per kernel tap, then one matmul); max-pooling reshapes into windows and routes the
gradient to the first maximum of each window.  No Python loop runs over samples or pixels.

Adam follows the spec's epsilon convention literally, with the update written in the order Keras 3 writes it
(``m += (g - m) * (1 - b1)``), so that aligned float32 runs round like Keras.

With ``DLCOMPARE_ARRAY_MODULE=cupy`` (the ``cupy`` backend) the same code runs on the GPU through CuPy.
"""

from __future__ import annotations

import math
import os

import numpy as np

from models.spec import (
    SGD,
    Activation,
    Adagrad,
    Adam,
    AdamW,
    AveragePooling2D,
    BatchNorm,
    Conv2D,
    Dense,
    Dropout,
    Flatten,
    LayerNorm,
    MaxPool2D,
    ModelSpec,
    RMSprop,
    init_state,
)

from .base import BuildOptions, Capabilities, ModelBase, Unsupported, lookup, to_mib

_USE_CUPY = os.environ.get("DLCOMPARE_ARRAY_MODULE") == "cupy"
BACKEND = "cupy" if _USE_CUPY else "numpy"

CAPABILITIES = Capabilities(
    devices=("cuda",) if _USE_CUPY else ("cpu",),
    # the scratch backend *is* the spec: it has no framework defaults, so native mode runs the same code
    notes=("hand-written backward pass; the reference every other backend is compared with",),
)


def _xp():
    if _USE_CUPY:
        import cupy

        return cupy
    return np


def probe() -> str:
    xp = _xp()
    if _USE_CUPY:
        xp.cuda.runtime.getDeviceCount()  # raises if no GPU/driver
    return xp.__version__


def devices() -> list[str]:
    if not _USE_CUPY:
        return ["cpu"]
    try:
        return ["cuda"] if _xp().cuda.runtime.getDeviceCount() > 0 else []
    except Exception:
        return []


# ------------------------------------------------------------------------------------------------- the layer maths
def _erf(xp, z):
    """erf elementwise (NumPy has none; math.erf is correctly rounded to within an ulp)."""
    if xp is np:
        return np.frompyfunc(math.erf, 1, 1)(z).astype(z.dtype)
    import cupyx.scipy.special

    return cupyx.scipy.special.erf(z)


_GELU_C = math.sqrt(2.0 / math.pi)


def _act(xp, z, kind, layer=None):
    """The activation ``kind``; ``layer`` (an Activation) carries leaky_relu's slope and gelu's form."""
    if kind == "relu":
        return xp.maximum(z, 0)
    if kind == "sigmoid":
        return _sigmoid(xp, z)
    if kind == "tanh":
        return xp.tanh(z)
    if kind == "softmax":
        return _softmax(xp, z)
    if kind == "leaky_relu":
        return xp.where(z > 0, z, z * z.dtype.type(layer.negative_slope))
    if kind == "gelu":
        dt = z.dtype.type
        if layer.approximate == "tanh":
            return dt(0.5) * z * (1 + xp.tanh(dt(_GELU_C) * (z + dt(0.044715) * z * z * z)))
        return dt(0.5) * z * (1 + _erf(xp, z / dt(math.sqrt(2.0))))
    return z


def _act_grad(xp, z, a, kind, da, layer=None):
    if kind == "relu":
        return da * (z > 0)
    if kind == "sigmoid":
        return da * a * (1 - a)
    if kind == "tanh":
        return da * (1 - a * a)
    if kind == "softmax":  # the Jacobian of softmax over the last axis, applied
        return a * (da - (da * a).sum(axis=-1, keepdims=True))
    if kind == "leaky_relu":
        return xp.where(z > 0, da, da * z.dtype.type(layer.negative_slope))
    if kind == "gelu":
        dt = z.dtype.type
        if layer.approximate == "tanh":
            t = xp.tanh(dt(_GELU_C) * (z + dt(0.044715) * z * z * z))
            return da * (dt(0.5) * (1 + t) + dt(0.5) * z * (1 - t * t) * dt(_GELU_C) * (1 + dt(3 * 0.044715) * z * z))
        cdf = dt(0.5) * (1 + _erf(xp, z / dt(math.sqrt(2.0))))
        pdf = xp.exp(dt(-0.5) * z * z) / dt(math.sqrt(2.0 * math.pi))
        return da * (cdf + z * pdf)
    return da


def _sigmoid(xp, z):
    # stable for both signs: exp of a non-positive number only
    e = xp.exp(-xp.abs(z))
    return xp.where(z >= 0, 1 / (1 + e), e / (1 + e))


def _log_softmax(xp, z):
    z = z - z.max(axis=-1, keepdims=True)
    return z - xp.log(xp.exp(z).sum(axis=-1, keepdims=True))


def _softmax(xp, z, divide=False):
    """``exp(log_softmax(z))``, or with ``divide`` the other textbook form ``exp(z - max) / sum``: the same number,
    rounded differently where it matters most (``p - 1`` of a saturated class cancels; frameworks use either)."""
    if divide:
        e = xp.exp(z - z.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)
    return xp.exp(_log_softmax(xp, z))


def _sigmoid_tanh(xp, z):
    return 0.5 + 0.5 * xp.tanh(0.5 * z)  # the form XLA and some BLAS-backed libraries use


def loss_and_grad(xp, spec: ModelSpec, out, y, alt_formula=False):
    """Loss (reduced per spec) and d loss / d out, where ``out`` is the last layer's output (logits for the CEs).

    ``alt_formula``: the gradient's sigmoid / softmax by the other equivalent formula (a rounding variant)."""
    n = out.shape[0]
    kind = spec.loss.kind
    if kind == "sse":
        diff = out - y
        per_sample = (diff * diff).sum(axis=-1)
        grad = 2 * diff
    elif kind == "mse":  # mean over the last axis, like Keras
        diff = out - y
        k = out.shape[-1]
        per_sample = (diff * diff).mean(axis=-1)
        grad = 2 * diff / k
    elif kind == "sparse_categorical_crossentropy":  # -log p[label] on probabilities, no clipping
        rows = xp.arange(n)
        picked = out[rows, y]
        per_sample = -xp.log(picked)
        grad = xp.zeros_like(out)
        grad[rows, y] = -1 / picked
    elif kind == "binary_crossentropy":
        # mean over the output units, like Keras; stable: max(z,0) - z*y + log(1 + exp(-|z|))
        per_elem = xp.maximum(out, 0) - out * y + xp.log1p(xp.exp(-xp.abs(out)))
        k = out.shape[-1]
        per_sample = per_elem.mean(axis=-1)
        grad = ((_sigmoid_tanh(xp, out) if alt_formula else _sigmoid(xp, out)) - y) / k
    else:  # softmax_crossentropy with integer labels
        logp = _log_softmax(xp, out)
        rows = xp.arange(n)
        per_sample = -logp[rows, y]
        grad = _softmax(xp, out, divide=True) if alt_formula else xp.exp(logp)
        grad[rows, y] -= 1
    if spec.loss.class_weights:  # each sample's loss times its class's weight; the mean still divides by n
        w = xp.asarray(np.asarray(spec.loss.class_weights, dtype=out.dtype))[y]
        per_sample = per_sample * w
        grad = grad * w[:, None]
    if spec.loss.reduction == "mean":
        return per_sample.mean(), grad / n
    return per_sample.sum(), grad


def _mm(a, b):
    return a @ b


def _colsum(a):
    return a.sum(axis=0)


def _mm_blocked(a, b):
    """``a @ b`` with the inner dimension summed in two blocks: the same product, another rounding (an oracle variant)."""
    k = a.shape[-1]
    if k < 2:
        return a @ b
    h = k // 2
    return a[..., :h] @ b[:h] + a[..., h:] @ b[h:]


def _taps(x, kh, kw, sh, sw, ho, wo):
    """The (kh * kw) strided views of ``x`` (N, H, W, C), one per window tap in row-major (i, j) order, each
    (N, ho, wo, C)."""
    return [x[:, i : i + sh * (ho - 1) + 1 : sh, j : j + sw * (wo - 1) + 1 : sw, :] for i in range(kh) for j in range(kw)]


def _pad(xp, x, pads, value=0.0):
    (t, b), (left, r) = pads
    if t == b == left == r == 0:
        return x
    return xp.pad(x, ((0, 0), (t, b), (left, r), (0, 0)), constant_values=value)


def _scatter_taps(xp, shape, dtaps, kh, kw, sh, sw, ho, wo, pads):
    """Inverse of :func:`_taps` + :func:`_pad`: add each tap's gradient into a padded zero array, then crop."""
    (t, b), (left, r) = pads
    n, h, wd, c = shape
    dx = xp.zeros((n, h + t + b, wd + left + r, c), dtype=dtaps[0].dtype)
    for k, d in enumerate(dtaps):  # one scatter-add per tap
        i, j = divmod(k, kw)
        dx[:, i : i + sh * (ho - 1) + 1 : sh, j : j + sw * (wo - 1) + 1 : sw, :] += d
    return dx[:, t : t + h, left : left + wd, :]


def _conv_forward(xp, x, w, mm=_mm, strides=(1, 1), pads=((0, 0), (0, 0))):
    """x (N,H,W,C), w (kh,kw,C,F) -> (N,Ho,Wo,F) and the im2col patches (N*Ho*Wo, kh*kw*C); zero ``pads`` first."""
    x = _pad(xp, x, pads)
    n, h, wd, c = x.shape
    kh, kw, _, f = w.shape
    sh, sw = strides
    ho, wo = (h - kh) // sh + 1, (wd - kw) // sw + 1
    patches = xp.stack(_taps(x, kh, kw, sh, sw, ho, wo), axis=3)
    patches = patches.reshape(n * ho * wo, kh * kw * c)  # tap order (i, j) then channel = HWIO's order
    return mm(patches, w.reshape(kh * kw * c, f)).reshape(n, ho, wo, f), patches


def _conv_backward(xp, x_shape, w, patches, dout, need_dx=True, mm=_mm, colsum=_colsum, strides=(1, 1),
                   pads=((0, 0), (0, 0))):
    kh, kw, c, f = w.shape
    n, ho, wo, _ = dout.shape
    d2 = dout.reshape(n * ho * wo, f)
    dw = mm(patches.T, d2).reshape(w.shape)
    if not need_dx:
        return None, dw, colsum(d2)
    dpatches = mm(d2, w.reshape(kh * kw * c, f).T).reshape(n, ho, wo, kh * kw, c)
    dx = _scatter_taps(xp, x_shape, [dpatches[:, :, :, t, :] for t in range(kh * kw)], kh, kw, *strides, ho, wo, pads)
    return dx, dw, colsum(d2)


def _pool_forward(xp, x, p, s=None):
    """Max over p x p windows at stride s ('valid'); the index of the first maximum of each window (row-major)."""
    s = p if s is None else s
    n, h, w, c = x.shape
    ho, wo = (h - p) // s + 1, (w - p) // s + 1
    if s == p:
        win = x[:, : ho * p, : wo * p, :].reshape(n, ho, p, wo, p, c).transpose(0, 1, 3, 5, 2, 4).reshape(n, ho, wo, c, p * p)
    else:
        win = xp.stack(_taps(x, p, p, s, s, ho, wo), axis=-1)
    idx = win.argmax(axis=-1)  # first maximum wins ties
    return xp.take_along_axis(win, idx[..., None], axis=-1)[..., 0], idx


def _pool_backward(xp, x_shape, p, idx, dout, s=None):
    s = p if s is None else s
    n, h, w, c = x_shape
    ho, wo = (h - p) // s + 1, (w - p) // s + 1
    dwin = xp.zeros((n, ho, wo, c, p * p), dtype=dout.dtype)
    xp.put_along_axis(dwin, idx[..., None], dout[..., None], axis=-1)
    if s != p:
        return _scatter_taps(xp, x_shape, [dwin[..., t] for t in range(p * p)], p, p, s, s, ho, wo, ((0, 0), (0, 0)))
    dx = xp.zeros(x_shape, dtype=dout.dtype)
    dx[:, : ho * p, : wo * p, :] = dwin.reshape(n, ho, wo, c, p, p).transpose(0, 1, 4, 2, 5, 3).reshape(n, ho * p, wo * p, c)
    return dx


# Each layer type maps to (forward, backward); both see a context with the array module and the rounding hooks.
#   forward(ctx, layer, params, state, x, training, index) -> (output, cache, new_state or None)
#   backward(ctx, layer, params, cache, dout, need_dx) -> (d input or None, [d param in the layer's order])
# params / state are the layer's trainable / state arrays in its ParamSpec order.
class _Ctx:
    def __init__(self, xp, mm=_mm, colsum=_colsum, masks=None):
        self.xp, self.mm, self.colsum, self.masks = xp, mm, colsum, masks or {}


def _dense_fwd(ctx, layer, params, state, x, training, i):
    z = ctx.mm(x, params[0])
    if layer.use_bias:
        z = z + params[1]
    a = _act(ctx.xp, z, layer.activation)
    return a, (x, z, a), None


def _dense_bwd(ctx, layer, params, cache, dout, need_dx):
    x, z, a = cache
    dz = _act_grad(ctx.xp, z, a, layer.activation, dout)
    grads = [ctx.mm(x.T, dz)] + ([ctx.colsum(dz)] if layer.use_bias else [])
    return (ctx.mm(dz, params[0].T) if need_dx else None), grads


def _conv_fwd(ctx, layer, params, state, x, training, i):
    pads = layer.pads(x.shape[1:])
    z, patches = _conv_forward(ctx.xp, x, params[0], ctx.mm, layer.strides, pads)
    if layer.use_bias:
        z = z + params[1]
    a = _act(ctx.xp, z, layer.activation)
    return a, (x.shape, patches, z, a, pads), None


def _conv_bwd(ctx, layer, params, cache, dout, need_dx):
    x_shape, patches, z, a, pads = cache
    dz = _act_grad(ctx.xp, z, a, layer.activation, dout)
    dx, dw, db = _conv_backward(ctx.xp, x_shape, params[0], patches, dz, need_dx=need_dx, mm=ctx.mm,
                                colsum=ctx.colsum, strides=layer.strides, pads=pads)
    return dx, [dw] + ([db] if layer.use_bias else [])


def _pool_fwd(ctx, layer, params, state, x, training, i):
    a, idx = _pool_forward(ctx.xp, x, layer.pool_size, layer.stride)
    return a, (x.shape, idx), None


def _pool_bwd(ctx, layer, params, cache, dout, need_dx):
    x_shape, idx = cache
    return _pool_backward(ctx.xp, x_shape, layer.pool_size, idx, dout, layer.stride), []


def _avgpool_fwd(ctx, layer, params, state, x, training, i):
    """Sum of the window's taps over the zero-padded input, divided by how many of them lie inside the image (TF's
    'same'; at 'valid' every window counts pool_size**2)."""
    xp, p, s = ctx.xp, layer.pool_size, layer.stride
    pads = layer.pads(x.shape[1:])
    n, h, w, c = x.shape
    (t, b), (left, r) = pads
    ho, wo = (h + t + b - p) // s + 1, (w + left + r - p) // s + 1
    total = sum(_taps(_pad(xp, x, pads), p, p, s, s, ho, wo))
    ones = _pad(xp, xp.ones((1, h, w, 1), dtype=x.dtype), pads)
    count = sum(_taps(ones, p, p, s, s, ho, wo))  # (1, ho, wo, 1): in-image values per window
    return total / count, (x.shape, count, pads), None


def _avgpool_bwd(ctx, layer, params, cache, dout, need_dx):
    x_shape, count, pads = cache
    p, s = layer.pool_size, layer.stride
    d = dout / count
    return _scatter_taps(ctx.xp, x_shape, [d] * (p * p), p, p, s, s, d.shape[1], d.shape[2], pads), []


def _flatten_fwd(ctx, layer, params, state, x, training, i):
    return x.reshape(x.shape[0], -1), (x.shape,), None


def _flatten_bwd(ctx, layer, params, cache, dout, need_dx):
    return dout.reshape(cache[0]), []


def _activation_fwd(ctx, layer, params, state, x, training, i):
    a = _act(ctx.xp, x, layer.activation, layer)
    return a, (x, a), None


def _activation_bwd(ctx, layer, params, cache, dout, need_dx):
    x, a = cache
    return _act_grad(ctx.xp, x, a, layer.activation, dout, layer), []


def _ln_fwd(ctx, layer, params, state, x, training, i):
    """Normalise each sample's last axis by its own mean and biased variance; the same in both modes."""
    gamma, beta = params
    dt = x.dtype.type
    k = x.shape[-1]
    mean = x.sum(axis=-1, keepdims=True) / dt(k)
    xc = x - mean
    var = (xc * xc).sum(axis=-1, keepdims=True) / dt(k)
    inv = 1 / ctx.xp.sqrt(var + dt(layer.epsilon))
    xhat = xc * inv
    return xhat * gamma + beta, (xhat, inv, gamma), None


def _ln_bwd(ctx, layer, params, cache, dout, need_dx):
    xhat, inv, gamma = cache
    k = xhat.shape[-1]
    dy2, xhat2 = dout.reshape(-1, k), xhat.reshape(-1, k)
    grads = [ctx.colsum(dy2 * xhat2), ctx.colsum(dy2)]
    dx = None
    if need_dx:
        dxhat = dout * gamma
        dx = (dxhat - dxhat.mean(axis=-1, keepdims=True) - xhat * (dxhat * xhat).mean(axis=-1, keepdims=True)) * inv
    return dx, grads


def _bn_fwd(ctx, layer, params, state, x, training, i):
    """Normalise over every axis but the last; training: the batch's mean and biased variance (sums through the
    rounding hook ``colsum``), the state moved by ``momentum``; inference: the moving statistics."""
    xp = ctx.xp
    gamma, beta = params
    moving_mean, moving_var = state
    x2 = x.reshape(-1, x.shape[-1])
    n = x2.shape[0]
    dt = x.dtype.type
    eps = dt(layer.epsilon)
    if not training:
        inv = 1 / xp.sqrt(moving_var + eps)
        return ((x2 - moving_mean) * inv * gamma + beta).reshape(x.shape), None, None
    mean = ctx.colsum(x2) / dt(n)
    xc = x2 - mean
    var = ctx.colsum(xc * xc) / dt(n)
    inv = 1 / xp.sqrt(var + eps)
    xhat = xc * inv
    out = (xhat * gamma + beta).reshape(x.shape)
    stored = var * dt(n / (n - 1)) if layer.unbiased_moving_variance and n > 1 else var
    mom = dt(layer.momentum)
    new_state = [moving_mean * mom + mean * (1 - mom), moving_var * mom + stored * (1 - mom)]
    return out, (x.shape, xhat, inv, gamma), new_state


def _bn_bwd(ctx, layer, params, cache, dout, need_dx):
    x_shape, xhat, inv, gamma = cache
    dy = dout.reshape(xhat.shape)
    n = dy.shape[0]
    dbeta = ctx.colsum(dy)
    dgamma = ctx.colsum(dy * xhat)
    dx = None
    if need_dx:
        # d/dx of gamma * (x - mean(x)) / sqrt(var(x) + eps): the batch statistics depend on every sample
        dx = ((dy - dbeta / n - xhat * (dgamma / n)) * (gamma * inv)).reshape(x_shape)
    return dx, [dgamma, dbeta]


def _dropout_fwd(ctx, layer, params, state, x, training, i):
    if not training or layer.rate == 0:
        return x, None, None
    mask = ctx.masks[i]
    return x * mask, mask, None


def _dropout_bwd(ctx, layer, params, cache, dout, need_dx):
    return (dout if cache is None else dout * cache), []


LAYER_BUILDERS = {
    Dense: (_dense_fwd, _dense_bwd),
    Conv2D: (_conv_fwd, _conv_bwd),
    MaxPool2D: (_pool_fwd, _pool_bwd),
    AveragePooling2D: (_avgpool_fwd, _avgpool_bwd),
    Flatten: (_flatten_fwd, _flatten_bwd),
    Activation: (_activation_fwd, _activation_bwd),
    BatchNorm: (_bn_fwd, _bn_bwd),
    LayerNorm: (_ln_fwd, _ln_bwd),
    Dropout: (_dropout_fwd, _dropout_bwd),
}


def _split(spec: ModelSpec, params, state):
    """Per layer: (its trainable arrays, its state arrays), in the layer's ``params()`` order."""
    return [(list(p.values()), list(s.values())) for p, s in spec.by_layer(params, state or ())]


def forward(xp, spec: ModelSpec, params, x, keep=False, mm=_mm, state=None, training=False, ctx=None, overrides=None):
    """Network output (before the loss's sigmoid/softmax) and, with ``keep``, the per-layer caches for backward.
    ``training`` selects training mode (batch statistics, dropout with ``ctx.masks``); the state after the pass (moved
    by a training pass, else unchanged) is left in ``ctx.new_state``.  ``overrides`` {layer index: (forward,
    backward)} replaces a layer's pair (a planted bug's own layer: ``harness.mutants``)."""
    ctx = ctx or _Ctx(xp, mm)
    caches = []
    new_state = []
    for i, (layer, (lp, ls)) in enumerate(zip(spec.layers, _split(spec, params, state))):
        fwd, _ = (overrides or {}).get(i) or lookup(LAYER_BUILDERS, layer, BACKEND)
        x, cache, ns = fwd(ctx, layer, lp, ls, x, training, i)
        if keep:
            caches.append(cache)
        new_state += ns if ns is not None else ls
    ctx.new_state = new_state
    return x, caches


def backward(xp, spec: ModelSpec, params, caches, dout, mm=_mm, colsum=_colsum, ctx=None, overrides=None):
    """Gradients of every parameter, in ``spec.param_names()`` order, given d loss / d output (``overrides`` as in
    :func:`forward`)."""
    ctx = ctx or _Ctx(xp, mm, colsum)
    split = _split(spec, params, [None] * len(spec.state_entries()))
    first = min(i for i, _, _ in spec.param_layers())  # nothing needs the gradient of what comes before it
    grads = []
    for i in range(len(spec.layers) - 1, first - 1, -1):
        _, bwd = (overrides or {}).get(i) or lookup(LAYER_BUILDERS, spec.layers[i], BACKEND)
        dout, g = bwd(ctx, spec.layers[i], split[i][0], caches[i], dout, i > first)
        grads = g + grads
    return grads


def predict_from_output(xp, spec: ModelSpec, out, alt_formula=False):
    pred = spec.loss.prediction
    if pred == "sigmoid":
        return _sigmoid_tanh(xp, out) if alt_formula else _sigmoid(xp, out)
    if pred == "softmax":
        return _softmax(xp, out, divide=alt_formula)
    return out


def _lr(model):
    """The learning rate of the update being applied (``model.t`` counts it already), in the run's dtype."""
    return model.dtype.type(model.spec.lr_at(model.t - 1))


def _sgd(model, grads):
    opt = model.spec.optimizer
    lr = _lr(model)
    if opt.momentum == 0:
        for p, g in zip(model.params, grads):
            p -= lr * g
        return
    mu = model.dtype.type(opt.momentum)
    for p, b, g in zip(model.params, model.m, grads):
        if opt.momentum_form == "accumulator":  # torch / TF1 / optax: b = mu*b + g; w -= lr*b (Nesterov lr*(g + mu*b))
            b *= mu
            b += g
            p -= lr * (g + mu * b) if opt.nesterov else lr * b
        else:  # Keras: v = mu*v - lr*g; w += v (Nesterov w += mu*v - lr*g)
            b *= mu
            b -= lr * g
            p += mu * b - lr * g if opt.nesterov else b


def _adam(model, grads):
    xp, opt, dt = model.xp, model.spec.optimizer, model.dtype.type
    b1, b2, eps, lr = dt(opt.beta1), dt(opt.beta2), dt(opt.epsilon), _lr(model)
    t = dt(model.t)
    b1t, b2t = b1**t, b2**t
    if opt.convention == "eps_hat":
        alpha = lr * xp.sqrt(1 - b2t) / (1 - b1t)
    if model.perturb is not None:  # one random ulp on each moment, like an update rounded another way
        for m, v in zip(model.m, model.v):
            m[...] = model.perturb(m)
            v[...] = model.perturb(v)
    if "adam_order" in model.rounding:  # the same update in torch.optim.Adam's order of operations
        for p, m, v, g in zip(model.params, model.m, model.v, grads):
            m *= b1
            m += (1 - b1) * g
            v *= b2
            v += (1 - b2) * (g * g)
            if opt.convention == "eps_hat":
                p -= alpha * (m / (xp.sqrt(v) + eps))
            else:
                p -= (lr / (1 - b1t)) * (m / (xp.sqrt(v) / xp.sqrt(1 - b2t) + eps))
        return
    for p, m, v, g in zip(model.params, model.m, model.v, grads):
        m += (g - m) * (1 - b1)
        v += (g * g - v) * (1 - b2)
        if opt.convention == "eps_hat":
            p -= (m * alpha) / (xp.sqrt(v) + eps)
        else:  # eps_v_hat: torch / optax
            p -= lr * (m / (1 - b1t)) / (xp.sqrt(v / (1 - b2t)) + eps)


def _adamw(model, grads):
    """Decoupled weight decay, then Adam: ``w -= lr_t * wd * w`` (or ``wd * w``) before the Adam update."""
    opt = model.spec.optimizer
    decay = model.dtype.type(opt.weight_decay) * (_lr(model) if opt.decay_times_lr else model.dtype.type(1))
    for p in model.params:
        p -= decay * p
    _adam(model, grads)


def _scaled_step(model, grads, accumulate):
    """RMSprop / Adagrad: ``v`` (started at the optimizer's initial accumulator) moved by ``accumulate``, then
    ``w -= lr*g / sqrt(v + eps)`` or ``lr*g / (sqrt(v) + eps)``."""
    xp, opt, dt = model.xp, model.spec.optimizer, model.dtype.type
    lr, eps = _lr(model), dt(opt.epsilon)
    if model.t == 1:
        for v in model.v:
            v[...] = dt(opt.initial_accumulator)
    for p, v, g in zip(model.params, model.v, grads):
        accumulate(v, g)
        if opt.epsilon_inside_sqrt:  # Keras' order: (lr * g) / sqrt(v + eps)
            p -= (lr * g) / xp.sqrt(v + eps)
        else:
            p -= (lr * g) / (xp.sqrt(v) + eps)


def _rmsprop(model, grads):
    rho = model.dtype.type(model.spec.optimizer.rho)

    def accumulate(v, g):
        v[...] = rho * v + (1 - rho) * (g * g)

    _scaled_step(model, grads, accumulate)


def _adagrad(model, grads):
    def accumulate(v, g):
        v += g * g

    _scaled_step(model, grads, accumulate)


def clip_gradients(xp, spec: ModelSpec, grads):
    """The spec's gradient clipping (:class:`models.spec.ClipNorm`), in the gradients' dtype; unchanged without it or
    where the norm is within ``max_norm``."""
    clip = spec.clip
    if clip is None:
        return grads
    dt = grads[0].dtype.type
    m = dt(clip.max_norm)
    if clip.scope == "global":
        norm = xp.sqrt(sum((g * g).sum() for g in grads))
        return [g * (m / norm) for g in grads] if norm > m else grads
    out = []
    for g in grads:
        norm = xp.sqrt((g * g).sum())
        out.append(g * (m / norm) if norm > m else g)
    return out


# optimizer type -> update(model, grads), after model.t += 1 and the spec's clipping
OPTIMIZER_BUILDERS = {SGD: _sgd, Adam: _adam, AdamW: _adamw, RMSprop: _rmsprop, Adagrad: _adagrad}
VOCAB_READY = True  # every type of models.spec.LAYERS / OPTIMIZERS has its forward, backward or update here


# ------------------------------------------------------------------------------------------------------- the model
# Rounding variants (``BuildOptions.extra["rounding"] = "blocked+reversed"``): the same mathematics in another order of
# floating-point operations.  The agreement engine runs the oracle in the compared dtype with each of them; their spread
# around the float64 oracle is the envelope of what a correct implementation in that dtype computes.
ROUNDING_VARIANTS = {
    "blocked": "every matmul's inner dimension summed in two blocks",
    "reversed": "the samples of each batch in reverse order (batch sums in the other order)",
    "adam_order": "Adam's moments and update in torch.optim.Adam's order (m = b1*m + (1-b1)*g, alpha*(m/(sqrt(v)+eps)))",
    "formula": "the loss gradient's and predictions' softmax as exp(z-max)/sum, sigmoid as 0.5+0.5*tanh(z/2)",
    "mca": "Monte Carlo arithmetic: every matmul result and bias-gradient sum moved by eps*(sum of its terms' "
           "magnitudes)*U(-1, 1) (a sum in another order), the loss, its gradient and every Adam moment by one random "
           "ulp, seeded by the variant's name",
    "switch": "Monte Carlo arithmetic as 'mca' but SWITCH_ULPS times coarser: a run that takes the ReLU / max-pool "
              "switches a correct float32 run may take and the one-ulp variants may all miss (the agreement engine "
              "counts it only in the late envelope of gradients, weights and final predictions)",
}
SWITCH_ULPS = 64


class Model(ModelBase):
    capabilities = CAPABILITIES

    def __init__(self, spec: ModelSpec, weights: list[np.ndarray], options: BuildOptions) -> None:
        super().__init__(spec, weights, options)
        if options.device not in CAPABILITIES.devices:
            raise Unsupported(f"device {options.device} not available to this backend (has {CAPABILITIES.devices})")
        self.xp = _xp()
        self.dtype = np.dtype(options.dtype)
        self.params = [self.xp.array(np.asarray(w, dtype=self.dtype), copy=True) for w in weights]  # never alias
        self.state = [self.xp.asarray(s.astype(self.dtype)) for s in init_state(spec)]
        for layer in spec.layers:
            lookup(LAYER_BUILDERS, layer, BACKEND)
        opt = spec.optimizer
        self._update = lookup(OPTIMIZER_BUILDERS, opt, BACKEND)
        self.t = 0  # updates applied so far (also tells a kept gradient from a stale one)
        self._kernels = [j for j, (_, _, p) in enumerate(spec.param_entries()) if p.role == "kernel"]
        self._last = None  # (t, x, y, loss, grads, state) of the last gradients() call, for the next train step
        self.m = [self.xp.zeros_like(p) for p in self.params]  # Adam's moments, SGD's momentum (unused otherwise)
        self.v = [self.xp.zeros_like(p) for p in self.params]
        rounding = options.extra.get("rounding", ())
        rounding = tuple(r for r in (rounding.split("+") if isinstance(rounding, str) else rounding) if r)
        unknown = set(rounding) - set(ROUNDING_VARIANTS)
        if unknown:
            raise ValueError(f"unknown rounding variant(s) {sorted(unknown)}; valid: {', '.join(ROUNDING_VARIANTS)}")
        self.rounding = rounding
        self.mm = _mm_blocked if "blocked" in rounding else _mm
        self.perturb = None
        self.colsum = _colsum
        if "mca" in rounding or "switch" in rounding:  # Monte Carlo arithmetic: a random ulp on every matmul's
            # result and every update ("switch": SWITCH_ULPS of them)
            rng = np.random.default_rng([int(options.extra.get("mca_seed", 0)), *map(ord, "+".join(rounding))])
            eps = np.finfo(self.dtype).eps * (SWITCH_ULPS if "switch" in rounding else 1)

            def noise(shape, dtype):
                return self.xp.asarray(rng.uniform(-1.0, 1.0, shape)).astype(dtype, copy=False)

            def perturb(a):
                return a * (1 + eps * noise(np.shape(a), a.dtype))

            def mm(a, b):
                # a dot product summed in another order moves by about one ulp of the sum of its terms' magnitudes,
                # not of the result: where the terms cancel, the result's own ulp is far smaller than its error.
                # r + eps*|a|@|b|*noise, evaluated in place (the same roundings in the same order: x*y == y*x and
                # x+y == y+x exactly), so that the large conv outputs are not copied three more times
                r = base(a, b)
                t = self.xp.abs(a) @ self.xp.abs(b)
                t *= eps
                t *= noise(r.shape, r.dtype)
                t += r
                return t

            def colsum(a):  # a bias gradient: the batch's sum, in another order
                return a.sum(axis=0) + eps * self.xp.abs(a).sum(axis=0) * noise(a.shape[1:], a.dtype)

            base = self.mm
            self.mm = mm
            self.colsum = colsum
            self.perturb = perturb
        self.info = {"optimizer": f"hand-written {type(opt).__name__}"
                     + (f" ({opt.convention} convention)" if hasattr(opt, "convention") else ""),
                     "array_module": self.xp.__name__}
        if rounding:
            self.info["rounding_variant"] = "+".join(rounding)
        if spec.random_layers:  # no RNG of its own: the harness's masks in both modes (a native row stays comparable)
            self.info["dropout_masks"] = "harness"
        self._pool_peak = 0  # cupy: the largest CuPy memory-pool size seen (gpu_peak_mb)

    def _in(self, x, y):
        xp = self.xp
        x = np.asarray(x, dtype=self.dtype)
        y = np.asarray(y, dtype=np.int64 if self.spec.loss.integer_labels else self.dtype)
        if "reversed" in self.rounding:  # the same batch, summed in the other order
            x, y = x[::-1], y[::-1]
        return xp.asarray(x), xp.asarray(y)

    def _ctx(self, batch_size):
        """The rounding hooks and this step's dropout masks (in the order of the batch's samples as computed)."""
        masks = dict(zip(self.spec.random_layers, (self.xp.asarray(m[::-1] if "reversed" in self.rounding else m)
                                                   for m in self.dropout_masks(self.t, batch_size))))
        return _Ctx(self.xp, self.mm, self.colsum, masks)

    def _loss_grads(self, x, y):
        """Loss, gradients and the state after the training-mode pass at the current weights."""
        ctx = self._ctx(len(x))
        out, caches = forward(self.xp, self.spec, self.params, x, keep=True, state=self.state, training=True, ctx=ctx)
        loss, dout = loss_and_grad(self.xp, self.spec, out, y, alt_formula="formula" in self.rounding)
        if self.perturb is not None:  # the loss and its gradient rounded another way (another exp, log, sum order)
            loss, dout = self.perturb(loss), self.perturb(dout)
        grads = backward(self.xp, self.spec, self.params, caches, dout, ctx=ctx)
        loss = self._add_l2(loss, grads)
        return loss, grads, ctx.new_state

    def _add_l2(self, loss, grads):
        """The spec's L2 penalty, l2 * sum(kernel**2) on every kernel: the loss with it, and 2 * l2 * kernel added to
        each kernel's gradient in ``grads`` (in place)."""
        if self.spec.loss.l2:
            l2 = self.dtype.type(self.spec.loss.l2)
            for j in self._kernels:
                k = self.params[j]
                loss = loss + l2 * (k * k).sum()
                grads[j] = grads[j] + (2 * l2) * k
        return loss

    def gradients(self, x, y):
        x, y = self._host(x, y)
        loss, grads, state = self._loss_grads(*self._in(x, y))
        self._last = (self.t, x, y, loss, grads, state)
        self._note_pool()
        return float(loss), [self._out(g) for g in grads]

    def train_step(self, x, y):
        x, y = self._host(x, y)
        last, self._last = self._last, None
        if (last is not None and self.perturb is None and last[0] == self.t and np.array_equal(last[1], x)
                and np.array_equal(last[2], y)):
            # The harness asks for the gradient at a check step and then trains on that very batch: the update's
            # gradient is the one just computed (same weights, same batch, same code: the same bits), which halves the
            # work of those steps.  Not with "mca": there the update draws its own noise, and reusing the reported
            # gradient's would consume the random stream differently and so move the envelope (measured: mnist_cnn
            # float32, seed 1, batch 100, the step-10 conv2 gradient envelope shrank ~100x and tf1 failed at 4.4x).
            loss, grads, state = last[3:]
        else:
            loss, grads, state = self._loss_grads(*self._in(x, y))
        self.state = state
        self._apply(grads)
        self._note_pool()
        return float(loss)

    def _host(self, x, y):
        """Own host copies in the model's dtypes: what ``gradients`` keeps for ``train_step`` to recognise its batch
        (a copy, so that a caller reusing its buffer cannot make another batch look like the kept one)."""
        return (np.array(x, dtype=self.dtype),
                np.array(y, dtype=np.int64 if self.spec.loss.integer_labels else self.dtype))

    def _apply(self, grads):
        self.t += 1
        self._update(self, clip_gradients(self.xp, self.spec, grads))

    def predict(self, x):
        return self._predict(x, training=False)

    def _predict(self, x, training: bool):
        """Predictions in inference mode (moving statistics, no dropout), or with ``training`` in training mode (a
        planted bug's mistake: ``harness.mutants``)."""
        x = self.xp.asarray(np.asarray(x, dtype=self.dtype))
        ctx = self._ctx(len(x)) if training else _Ctx(self.xp, self.mm)
        out, _ = forward(self.xp, self.spec, self.params, x, state=self.state, training=training, ctx=ctx)
        return self._out(predict_from_output(self.xp, self.spec, out, alt_formula="formula" in self.rounding))

    def get_weights(self):
        return [self._out(p) for p in self.params]

    def get_state(self):
        return [self._out(a) for a in self.state]

    def _out(self, a):
        return a.get() if _USE_CUPY else np.array(a)

    def sync(self):
        if _USE_CUPY:
            self.xp.cuda.Stream.null.synchronize()

    def _note_pool(self) -> None:
        """cupy: keep the largest size of CuPy's memory pool seen (one counter read per step; nothing on NumPy)."""
        if _USE_CUPY:
            self._pool_peak = max(self._pool_peak, self.xp.get_default_memory_pool().total_bytes())

    def gpu_peak_mb(self) -> float | None:
        """cupy: the largest size, in MiB, of CuPy's default device memory pool seen after any ``train_step`` or
        ``gradients`` call of this model or now (``cupy.get_default_memory_pool().total_bytes()``, on the current
        device); None on NumPy (the CPU).

        CuPy keeps no peak counter.  ``used_bytes()`` sampled after a step would miss the step's own temporaries
        (activations, per-layer gradients: freed when it returns), the bulk of a training step's memory.  The pool
        instead keeps every freed block cached for reuse, so its size (``total_bytes()``: blocks in use plus cached
        free ones) only grows until something calls ``free_all_blocks()`` and, between such calls, is an upper bound
        of the peak bytes in use: the peak allocation as the pool served it (sizes rounded up to 512-byte bins,
        blocks split or not yet merged), not the exact peak of live arrays that torch / JAX / TF report.  It covers
        every CuPy array of the process on that device, not this model's alone, and it counts nothing allocated
        outside the pool (cuBLAS workspaces, CUDA context)."""
        if not _USE_CUPY:
            return None
        self._note_pool()
        return to_mib(self._pool_peak)
