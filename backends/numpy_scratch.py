"""NumPy from scratch: hand-written forward and backward for every layer, activation and loss; the float64 oracle.

Layouts are the canonical ones (dense ``(in, out)``, conv HWIO, NHWC, flatten in (h, w, c) order): no conversion.
Convolution is im2col (one gather per kernel tap, then one matmul); max-pooling reshapes into windows and routes the
gradient to the first maximum of each window.  No Python loop runs over samples or pixels.

Adam follows the spec's epsilon convention literally, with the update written in the order Keras 3 writes it
(``m += (g - m) * (1 - b1)``), so that aligned float32 runs round like Keras.

With ``DLCOMPARE_ARRAY_MODULE=cupy`` (the ``cupy`` backend) the same code runs on the GPU through CuPy.
"""

from __future__ import annotations

import os

import numpy as np

from models.spec import SGD, Adam, Conv2D, Dense, Flatten, MaxPool2D, ModelSpec

from .base import BuildOptions, Capabilities, ModelBase, Unsupported

_USE_CUPY = os.environ.get("DLCOMPARE_ARRAY_MODULE") == "cupy"

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
def _act(xp, z, kind):
    if kind == "relu":
        return xp.maximum(z, 0)
    if kind == "sigmoid":
        return _sigmoid(xp, z)
    return z


def _act_grad(xp, z, a, kind, da):
    if kind == "relu":
        return da * (z > 0)
    if kind == "sigmoid":
        return da * a * (1 - a)
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


def _conv_forward(xp, x, w, mm=_mm):
    """x (N,H,W,C), w (kh,kw,C,F) -> (N,Ho,Wo,F) and the im2col patches (N*Ho*Wo, kh*kw*C)."""
    n, h, wd, c = x.shape
    kh, kw, _, f = w.shape
    ho, wo = h - kh + 1, wd - kw + 1
    patches = xp.stack([x[:, i : i + ho, j : j + wo, :] for i in range(kh) for j in range(kw)], axis=3)
    patches = patches.reshape(n * ho * wo, kh * kw * c)  # tap order (i, j) then channel = HWIO's order
    return mm(patches, w.reshape(kh * kw * c, f)).reshape(n, ho, wo, f), patches


def _conv_backward(xp, x_shape, w, patches, dout, need_dx=True, mm=_mm, colsum=_colsum):
    n, h, wd, c = x_shape
    kh, kw, _, f = w.shape
    ho, wo = h - kh + 1, wd - kw + 1
    d2 = dout.reshape(n * ho * wo, f)
    dw = mm(patches.T, d2).reshape(w.shape)
    if not need_dx:
        return None, dw, colsum(d2)
    dpatches = mm(d2, w.reshape(kh * kw * c, f).T).reshape(n, ho, wo, kh * kw, c)
    dx = xp.zeros(x_shape, dtype=dout.dtype)
    for t in range(kh * kw):  # one scatter-add per kernel tap
        i, j = divmod(t, kw)
        dx[:, i : i + ho, j : j + wo, :] += dpatches[:, :, :, t, :]
    return dx, dw, colsum(d2)


def _pool_forward(xp, x, p):
    n, h, w, c = x.shape
    ho, wo = h // p, w // p
    win = x[:, : ho * p, : wo * p, :].reshape(n, ho, p, wo, p, c).transpose(0, 1, 3, 5, 2, 4).reshape(n, ho, wo, c, p * p)
    idx = win.argmax(axis=-1)  # first maximum wins ties
    return xp.take_along_axis(win, idx[..., None], axis=-1)[..., 0], idx


def _pool_backward(xp, x_shape, p, idx, dout):
    n, h, w, c = x_shape
    ho, wo = h // p, w // p
    dwin = xp.zeros((n, ho, wo, c, p * p), dtype=dout.dtype)
    xp.put_along_axis(dwin, idx[..., None], dout[..., None], axis=-1)
    dx = xp.zeros(x_shape, dtype=dout.dtype)
    dx[:, : ho * p, : wo * p, :] = dwin.reshape(n, ho, wo, c, p, p).transpose(0, 1, 4, 2, 5, 3).reshape(n, ho * p, wo * p, c)
    return dx


def forward(xp, spec: ModelSpec, params, x, keep=False, mm=_mm):
    """Network output (before the loss's sigmoid/softmax).  With ``keep`` also the per-layer caches for backward."""
    caches = []
    k = 0
    for layer in spec.layers:
        if isinstance(layer, Dense):
            w, b = params[k], params[k + 1]
            k += 2
            z = mm(x, w) + b
            a = _act(xp, z, layer.activation)
            cache = (x, z, a)
        elif isinstance(layer, Conv2D):
            w, b = params[k], params[k + 1]
            k += 2
            z, patches = _conv_forward(xp, x, w, mm)
            z = z + b
            a = _act(xp, z, layer.activation)
            cache = (x.shape, patches, z, a)
        elif isinstance(layer, MaxPool2D):
            a, idx = _pool_forward(xp, x, layer.pool_size)
            cache = (x.shape, idx)
        elif isinstance(layer, Flatten):
            a = x.reshape(x.shape[0], -1)
            cache = (x.shape,)
        else:  # pragma: no cover - spec validation rejects unknown layers
            raise TypeError(type(layer).__name__)
        if keep:
            caches.append(cache)
        x = a
    return x, caches


def backward(xp, spec: ModelSpec, params, caches, dout, mm=_mm, colsum=_colsum):
    """Gradients of every parameter, in ``spec.param_names()`` order, given d loss / d output."""
    grads = [None] * len(params)
    k = len(params)
    for layer, cache in zip(reversed(spec.layers), reversed(caches)):
        if isinstance(layer, Dense):
            k -= 2
            x, z, a = cache
            dz = _act_grad(xp, z, a, layer.activation, dout)
            grads[k], grads[k + 1] = mm(x.T, dz), colsum(dz)
            if k == 0:
                break  # the first parametrised layer: nothing needs the gradient of the data
            dout = mm(dz, params[k].T)
        elif isinstance(layer, Conv2D):
            k -= 2
            x_shape, patches, z, a = cache
            dz = _act_grad(xp, z, a, layer.activation, dout)
            dout, grads[k], grads[k + 1] = _conv_backward(xp, x_shape, params[k], patches, dz, need_dx=k > 0, mm=mm,
                                                          colsum=colsum)
            if k == 0:
                break
        elif isinstance(layer, MaxPool2D):
            x_shape, idx = cache
            dout = _pool_backward(xp, x_shape, layer.pool_size, idx, dout)
        else:  # Flatten
            dout = dout.reshape(cache[0])
    return grads


def predict_from_output(xp, spec: ModelSpec, out, alt_formula=False):
    pred = spec.loss.prediction
    if pred == "sigmoid":
        return _sigmoid_tanh(xp, out) if alt_formula else _sigmoid(xp, out)
    if pred == "softmax":
        return _softmax(xp, out, divide=alt_formula)
    return out


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
        opt = spec.optimizer
        self.t = 0  # updates applied so far (also tells a kept gradient from a stale one)
        self._last = None  # (t, x, y, loss, grads) of the last gradients() call, for the train step that follows it
        if isinstance(opt, Adam):
            self.m = [self.xp.zeros_like(p) for p in self.params]
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
                     + (f" ({opt.convention} convention)" if isinstance(opt, Adam) else ""),
                     "array_module": self.xp.__name__}
        if rounding:
            self.info["rounding_variant"] = "+".join(rounding)

    def _in(self, x, y):
        xp = self.xp
        x = np.asarray(x, dtype=self.dtype)
        y = np.asarray(y, dtype=np.int64 if self.spec.loss.integer_labels else self.dtype)
        if "reversed" in self.rounding:  # the same batch, summed in the other order
            x, y = x[::-1], y[::-1]
        return xp.asarray(x), xp.asarray(y)

    def _loss_grads(self, x, y):
        out, caches = forward(self.xp, self.spec, self.params, x, keep=True, mm=self.mm)
        loss, dout = loss_and_grad(self.xp, self.spec, out, y, alt_formula="formula" in self.rounding)
        if self.perturb is not None:  # the loss and its gradient rounded another way (another exp, log, sum order)
            loss, dout = self.perturb(loss), self.perturb(dout)
        return loss, backward(self.xp, self.spec, self.params, caches, dout, mm=self.mm, colsum=self.colsum)

    def gradients(self, x, y):
        x, y = self._host(x, y)
        loss, grads = self._loss_grads(*self._in(x, y))
        self._last = (self.t, x, y, loss, grads)
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
            loss, grads = last[3], last[4]
        else:
            loss, grads = self._loss_grads(*self._in(x, y))
        self._apply(grads)
        return float(loss)

    def _host(self, x, y):
        """Own host copies in the model's dtypes: what ``gradients`` keeps for ``train_step`` to recognise its batch
        (a copy, so that a caller reusing its buffer cannot make another batch look like the kept one)."""
        return (np.array(x, dtype=self.dtype),
                np.array(y, dtype=np.int64 if self.spec.loss.integer_labels else self.dtype))

    def _apply(self, grads):
        xp = self.xp
        opt = self.spec.optimizer
        dt = self.dtype.type
        self.t += 1
        if isinstance(opt, SGD):
            lr = dt(opt.lr)
            for p, g in zip(self.params, grads):
                p -= lr * g
            return
        b1, b2, eps, lr = dt(opt.beta1), dt(opt.beta2), dt(opt.epsilon), dt(opt.lr)
        t = dt(self.t)
        b1t, b2t = b1**t, b2**t
        if opt.convention == "eps_hat":
            alpha = lr * xp.sqrt(1 - b2t) / (1 - b1t)
        if self.perturb is not None:  # one random ulp on each moment, like an update rounded another way
            for m, v in zip(self.m, self.v):
                m[...] = self.perturb(m)
                v[...] = self.perturb(v)
        if "adam_order" in self.rounding:  # the same update in torch.optim.Adam's order of operations
            for p, m, v, g in zip(self.params, self.m, self.v, grads):
                m *= b1
                m += (1 - b1) * g
                v *= b2
                v += (1 - b2) * (g * g)
                if opt.convention == "eps_hat":
                    p -= alpha * (m / (xp.sqrt(v) + eps))
                else:
                    p -= (lr / (1 - b1t)) * (m / (xp.sqrt(v) / xp.sqrt(1 - b2t) + eps))
            return
        for p, m, v, g in zip(self.params, self.m, self.v, grads):
            m += (g - m) * (1 - b1)
            v += (g * g - v) * (1 - b2)
            if opt.convention == "eps_hat":
                p -= (m * alpha) / (xp.sqrt(v) + eps)
            else:  # eps_v_hat: torch / optax
                p -= lr * (m / (1 - b1t)) / (xp.sqrt(v / (1 - b2t)) + eps)

    def predict(self, x):
        x = self.xp.asarray(np.asarray(x, dtype=self.dtype))
        out, _ = forward(self.xp, self.spec, self.params, x, mm=self.mm)
        return self._out(predict_from_output(self.xp, self.spec, out, alt_formula="formula" in self.rounding))

    def get_weights(self):
        return [self._out(p) for p in self.params]

    def _out(self, a):
        return a.get() if _USE_CUPY else np.array(a)

    def sync(self):
        if _USE_CUPY:
            self.xp.cuda.Stream.null.synchronize()
