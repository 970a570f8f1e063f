"""Pure JAX: parameters as a list of arrays, the whole train step (loss, grad, update) under ``jax.jit``.

Layouts are the canonical ones as they are: ``jnp.dot`` on ``(in, out)`` kernels, ``lax.conv_general_dilated`` with
``('NHWC', 'HWIO', 'NHWC')``, flatten of NHWC in (h, w, c) order: no conversion anywhere.

* Every layer type and the optimizer are looked up in ``LAYER_BUILDERS`` / ``OPTIMIZER_BUILDERS``
  (``backends.base.lookup``) when the model is built: a type missing from them is ``Unsupported``, never dropped.
  A layer's arrays reach its builder by ParamSpec role (``kernel``, ``bias``, ``gamma``, ...), never by shape.
* BatchNorm: JAX has no BatchNorm of its own; the spec's formula is written from primitive ops in the oracle's order
  (batch mean and biased variance over every axis but the last, ``moving*momentum + stat*(1 - momentum)``, the stored
  variance times n/(n-1) when ``unbiased_moving_variance``).  Its moving statistics are the model's *state*: an
  argument of every jitted function and, from the train step, a result; ``gradients`` drops the new state.
* Dropout, aligned: times the harness's masks (``ModelBase.dropout_masks`` of the step), passed to the jitted step as
  arguments (stacked ``(k, B, ...)`` for the scan); native: ``jax.random.bernoulli`` with a key made in the step
  from the uint32 pair (run seed, step), passed as an argument, folded with the layer's index.
* Max-pooling is ``lax.reduce_window(max)``; its gradient goes to the *first* maximum of a window on ties, like the
  NumPy oracle (checked by ``tests/test_backend_torch_jax.py`` on the device JAX runs on; ties are common on MNIST:
  saturated pixels give identical patches and so identical positive conv outputs).
* ReLU is ``jax.nn.relu`` (gradient 0 at 0, like the oracle; ``jnp.maximum(z, 0)`` would give 0.5 there).
* Aligned losses are the spec's stable formulas from logits, written out.
* Aligned optimizers: the built-in ``optax.sgd(lr)`` (``p + (-lr*g)``: the spec's ``p - lr*g`` exactly) and, for the
  ``eps_v_hat`` convention, the built-in ``optax.adam(lr, b1, b2, eps=spec.epsilon)`` (optax adds eps to
  ``sqrt(v_hat)``; its bias corrections ``1 - b**count`` are float64 under ``jax_enable_x64``).  For ``eps_hat``, which
  no optax optimizer computes with a constant eps, Adam is written by hand in the spec's order (``m += (g - m)*(1-b1)``,
  ``v += (g*g - v)*(1-b2)``, ``p -= (m*alpha)/(sqrt(v) + eps)``) with ``alpha_t = lr*sqrt(1-b2^t)/(1-b1^t)`` computed
  in double on the host and passed in (a traced scalar: no retrace).  ``info["optimizer"]`` says which ran:
  ``"built-in optax.adam"`` or ``"hand-written, spec convention (eps_hat)"``.
* Aligned mode asks for ``Precision.HIGHEST`` on every dot/conv (no TF32 / bf16 passes on GPUs; no effect on CPU).
* float64 needs ``jax_enable_x64`` at start-up (the harness sets ``JAX_ENABLE_X64=1`` for float64 runs); a float64
  run without it raises ``Unsupported``.
* Intra-op threads cannot be changed after JAX has started (``XLA_FLAGS`` decides them); ``options.threads`` is
  recorded, not applied.

Every jitted function is lowered and compiled ahead of time on first use per input shape, so that
``info["trace_s"]`` (the train step's first trace + compile) is measured apart from the steps.  The jitted functions
and their executables are shared by all models of one spec, mode, dtype and device in a process (a multi-seed worker
traces and compiles once; ``info["compile_reused"]`` counts the reused ones, whose ``compile_s`` is the first model's).

Fast mode: ``train_steps`` runs ``lax.scan`` over the whole stack of batches in one compiled call instead of a Python
loop over the jitted step (same step function inside; see the test for the agreement).

Native mode: the built-in ``optax.adam`` / ``optax.sgd`` with their defaults (Adam eps 1e-8 added to ``sqrt(v_hat)``),
``optax.sigmoid_binary_cross_entropy`` / ``optax.softmax_cross_entropy_with_integer_labels`` (already stable from
logits, like the spec), XLA's default matmul precision, dropout from JAX's RNG.  BatchNorm has no JAX default to
fall back on, so native BatchNorm is the spec's (``info["batchnorm"]`` says so; it is no native difference).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from models.spec import SGD, Activation, Adam, BatchNorm, Conv2D, Dense, Dropout, Flatten, MaxPool2D, ModelSpec, init_state

from .base import BuildOptions, Capabilities, ModelBase, Unsupported, lookup

BACKEND = "jax"

CAPABILITIES = Capabilities(
    devices=("cpu", "cuda"),
    notes=("canonical layout as is (NHWC/HWIO); whole step under jax.jit; fast mode = lax.scan over the batches",
           "float64 needs JAX_ENABLE_X64=1 before jax is imported (the harness sets it)",
           "no BatchNorm in pure JAX: the spec's formula from primitive ops, in native mode too (native = spec)"),
)


def probe() -> str:
    return jax.__version__


def _gpus() -> list:
    try:
        return jax.devices("gpu")
    except RuntimeError:
        return []


def devices() -> list[str]:
    return ["cpu"] + (["cuda"] if _gpus() else [])


def x64_enabled() -> bool:
    return bool(jax.config.read("jax_enable_x64"))


# ---------------------------------------------------------------------------------------------- the layer maths
def _act(z, kind):
    if kind == "relu":
        return jax.nn.relu(z)
    if kind == "sigmoid":
        return jax.nn.sigmoid(z)
    return z


class _Pass:
    """What a layer sees of the pass it runs in: training or inference mode, the matmul/conv precision, and the
    dropout noise of this step (aligned: the harness's masks by layer index; native: a jax.random key)."""

    def __init__(self, training: bool, precision=None, masks=None, key=None):
        self.training, self.precision, self.masks, self.key = training, precision, masks or {}, key


# Each layer type maps to ``build(ctx, layer, params, state, x, index) -> (output, new state)``, where ``params`` /
# ``state`` are the layer's trainable / state arrays by ParamSpec role (``{"kernel": ..., "bias": ...}``).
def _dense(ctx, layer, p, s, x, i):
    z = jnp.dot(x, p["kernel"], precision=ctx.precision)
    if layer.use_bias:
        z = z + p["bias"]
    return _act(z, layer.activation), s


def _conv(ctx, layer, p, s, x, i):
    z = lax.conv_general_dilated(x, p["kernel"], window_strides=(1, 1), padding="VALID",
                                 dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=ctx.precision)
    if layer.use_bias:
        z = z + p["bias"]
    return _act(z, layer.activation), s


def _pool(ctx, layer, p, s, x, i):
    k = layer.pool_size
    return lax.reduce_window(x, -jnp.inf, lax.max, (1, k, k, 1), (1, k, k, 1), "VALID"), s


def _flatten(ctx, layer, p, s, x, i):
    return x.reshape(x.shape[0], -1), s  # NHWC -> (h, w, c) order


def _activation(ctx, layer, p, s, x, i):
    return _act(x, layer.activation), s


def _batch_norm(ctx, layer, p, s, x, i):
    """The spec's BatchNorm from primitive ops, in the oracle's order of operations (JAX has no BatchNorm of its own:
    native mode runs this too).  Training: the batch's mean and biased variance over every axis but the last, the state
    moved as ``moving*momentum + stat*(1 - momentum)`` (the variance times n/(n-1) when unbiased_moving_variance);
    inference: the moving statistics.  Constants are cast to the run's dtype first, like the oracle's."""
    dt = np.dtype(x.dtype).type
    x2 = x.reshape(-1, x.shape[-1])
    eps = dt(layer.epsilon)
    if not ctx.training:
        inv = 1 / jnp.sqrt(s["moving_variance"] + eps)
        return ((x2 - s["moving_mean"]) * inv * p["gamma"] + p["beta"]).reshape(x.shape), s
    n = x2.shape[0]
    mean = jnp.sum(x2, axis=0) / dt(n)
    xc = x2 - mean
    var = jnp.sum(xc * xc, axis=0) / dt(n)
    inv = 1 / jnp.sqrt(var + eps)
    out = (xc * inv * p["gamma"] + p["beta"]).reshape(x.shape)
    stored = var * dt(n / (n - 1)) if layer.unbiased_moving_variance and n > 1 else var
    mom = dt(layer.momentum)
    rest = dt(1) - mom
    return out, {"moving_mean": s["moving_mean"] * mom + mean * rest,
                 "moving_variance": s["moving_variance"] * mom + stored * rest}


def _dropout(ctx, layer, p, s, x, i):
    """Inverted dropout in training mode.  Aligned: times the harness's mask of this step (0 or 1/(1 - rate));
    native: JAX's own RNG, ``jax.random.bernoulli`` with a key folded from the run's seed, the step and the layer
    index (as flax's Dropout draws it: ``select(keep, x / keep_prob, 0)``)."""
    if not ctx.training or layer.rate == 0:
        return x, s
    if ctx.key is None:
        return x * ctx.masks[i], s
    keep_prob = 1.0 - layer.rate
    keep = jax.random.bernoulli(jax.random.fold_in(ctx.key, i), keep_prob, x.shape)
    return lax.select(keep, x / np.dtype(x.dtype).type(keep_prob), jnp.zeros_like(x)), s


LAYER_BUILDERS = {
    Dense: _dense,
    Conv2D: _conv,
    MaxPool2D: _pool,
    Flatten: _flatten,
    Activation: _activation,
    BatchNorm: _batch_norm,
    Dropout: _dropout,
}


def run(spec: ModelSpec, params, state, x, ctx: _Pass):
    """Network output (logits for the cross-entropies) and the state after the pass (moved in training mode), as a
    flat list in ``spec.state_names()`` order; canonical layout throughout."""
    new_state = []
    for i, (layer, (lp, ls)) in enumerate(zip(spec.layers, spec.by_layer(params, state))):
        x, ls = lookup(LAYER_BUILDERS, layer, BACKEND)(ctx, layer, lp, ls, x, i)
        new_state += list(ls.values())
    return x, new_state


def forward(spec: ModelSpec, params, x, precision=None, state=None):
    """Inference-mode network output (``state``: the moving statistics, default the initial ones)."""
    if state is None:
        state = [s.astype(np.dtype(x.dtype)) for s in init_state(spec)]
    return run(spec, params, state, x, _Pass(False, precision))[0]


def aligned_loss(spec: ModelSpec):
    kind, reduction = spec.loss.kind, spec.loss.reduction

    def loss(out, y):
        if kind == "sse":
            d = out - y
            per_sample = jnp.sum(d * d, axis=-1)
        elif kind == "binary_crossentropy":
            # max(z,0) - z*y + log(1 + exp(-|z|)), mean over the output units
            per_sample = jnp.mean(jnp.maximum(out, 0) - out * y + jnp.log1p(jnp.exp(-jnp.abs(out))), axis=-1)
        else:
            logp = jax.nn.log_softmax(out, axis=-1)
            per_sample = -jnp.take_along_axis(logp, y[:, None], axis=-1)[:, 0]
        return jnp.mean(per_sample) if reduction == "mean" else jnp.sum(per_sample)

    return loss


def native_loss(spec: ModelSpec):
    import optax

    kind, reduction = spec.loss.kind, spec.loss.reduction

    def loss(out, y):
        if kind == "sse":
            per_sample = jnp.sum((out - y) ** 2, axis=-1)
        elif kind == "binary_crossentropy":
            per_sample = jnp.mean(optax.sigmoid_binary_cross_entropy(out, y), axis=-1)
        else:
            per_sample = optax.softmax_cross_entropy_with_integer_labels(out, y)
        return jnp.mean(per_sample) if reduction == "mean" else jnp.sum(per_sample)

    return loss


def predict_from_output(spec: ModelSpec, out):
    pred = spec.loss.prediction
    if pred == "sigmoid":
        return jax.nn.sigmoid(out)
    if pred == "softmax":
        return jax.nn.softmax(out, axis=-1)
    return out


class _Jitted:
    """One jitted function and its compiled executables per argument signature, shared by every Model of the same
    spec, mode, dtype and device in this process (``_SHARED``): a worker that runs many seeds traces and compiles
    each function once.  The functions close over nothing but what that key determines (the spec, the optimizer
    transform, the precision, constants cast to the dtype), so a later model runs the very same executable."""

    def __init__(self, fn):
        self.jitted = jax.jit(fn)
        self.executables: dict = {}  # argument signature -> (executable, seconds its lowering and compile took)


_SHARED: dict = {}  # (spec, mode, dtype, device, x64) -> {function name: _Jitted}


class _AOT:
    """A jitted function compiled ahead of time once per argument signature, the compile time recorded apart.

    ``log[name]`` gets one entry per signature this model used: the seconds the compile took, also when an earlier
    model of the same key paid it (then ``reused[name]`` counts it)."""

    def __init__(self, shared: _Jitted, name: str, compile_log: dict, reused: dict):
        self.shared = shared
        self.name = name
        self.log = compile_log
        self.reused = reused
        self.cache: dict = {}

    def __call__(self, *args):
        leaves = jax.tree_util.tree_leaves(args)
        key = tuple((a.shape, a.dtype) for a in leaves)  # no str(): this runs every step
        exe = self.cache.get(key)
        if exe is None:
            hit = self.shared.executables.get(key)
            if hit is None:
                t = time.perf_counter()
                hit = (self.shared.jitted.lower(*args).compile(), round(time.perf_counter() - t, 4))
                self.shared.executables[key] = hit
            else:
                self.reused[self.name] = self.reused.get(self.name, 0) + 1
            exe, seconds = hit
            self.log.setdefault(self.name, []).append(seconds)
            self.cache[key] = exe
        return exe(*args)


# ----------------------------------------------------------------------------------------------- the optimizers
@dataclass
class _Optimizer:
    """An optimizer as the train step uses it: ``update(params, state, grads, alpha) -> (params, state)`` is pure
    (the jitted step of the first model of a key runs for every later one), ``init(params)`` its initial state."""

    init: Callable
    update: Callable
    description: str  # info["optimizer"]
    alpha: Callable | None = None  # t -> the hand-written Adam's per-step host scalar (None: a dummy zero is passed)
    native_differences: tuple[str, ...] = ()


def _optax():
    try:
        import optax
    except ImportError:
        raise Unsupported("optax is not installed (the built-in optimizers): pip install '.[jax]'") from None
    return optax


def _builtin(tx, description: str, diffs: tuple[str, ...] = ()) -> _Optimizer:
    optax = _optax()

    def update(params, state, grads, alpha):
        del alpha
        upd, state = tx.update(grads, state, params)
        return optax.apply_updates(params, upd), state

    return _Optimizer(tx.init, update, description, None, diffs)


def _sgd(opt: SGD, native: bool, dtype: np.dtype) -> _Optimizer:
    return _builtin(_optax().sgd(opt.lr), "built-in optax.sgd")  # p + (-lr*g): the spec's p - lr*g exactly


def _adam(opt: Adam, native: bool, dtype: np.dtype) -> _Optimizer:
    if native:
        diffs = () if opt.convention == "eps_v_hat" and opt.epsilon == 1e-8 else (
            f"Adam: optax.adam default eps=1e-08 added to sqrt(v_hat) (spec: eps={opt.epsilon:g}, "
            f"{opt.convention} convention)",)
        return _builtin(_optax().adam(opt.lr, b1=opt.beta1, b2=opt.beta2),
                        "built-in optax.adam; optax's defaults (eps=1e-08, eps_v_hat)", diffs)
    if opt.convention == "eps_v_hat":  # what optax.adam computes, with the spec's eps
        return _builtin(_optax().adam(opt.lr, b1=opt.beta1, b2=opt.beta2, eps=opt.epsilon), "built-in optax.adam")
    # eps_hat: optax has no constant-eps form of it; the spec's order, alpha_t computed on the host in double
    dt = dtype.type
    b1c, b2c, eps = dt(1.0 - opt.beta1), dt(1.0 - opt.beta2), dt(opt.epsilon)

    def init(params):
        zeros = [np.zeros(p.shape, dtype) for p in params]
        return zeros, [z.copy() for z in zeros]

    def update(params, state, grads, alpha):
        # alpha = lr*sqrt(1-b2^t)/(1-b1^t), computed on the host in double
        ms, vs = state
        new_p, new_m, new_v = [], [], []
        for p, m, v, g in zip(params, ms, vs, grads):
            m = m + (g - m) * b1c
            v = v + (g * g - v) * b2c
            new_p.append(p - (m * alpha) / (jnp.sqrt(v) + eps))
            new_m.append(m)
            new_v.append(v)
        return new_p, (new_m, new_v)

    def alpha(t: int) -> float:
        return opt.lr * np.sqrt(1.0 - opt.beta2**t) / (1.0 - opt.beta1**t)

    return _Optimizer(init, update, f"hand-written, spec convention ({opt.convention}); optax.adam adds a constant "
                                    "eps to sqrt(v_hat) (eps_v_hat)", alpha)


OPTIMIZER_BUILDERS = {SGD: _sgd, Adam: _adam}  # optimizer type -> build(opt, native, dtype) -> _Optimizer


# What a layer type adds to ``info`` (under its lowercased name), and in native mode to ``native_differences``.
def _bn_info(layer, native: bool):
    return ("no BatchNorm in pure JAX: the spec's formula from primitive ops (batch mean and biased variance, "
            "moving = momentum*moving + (1 - momentum)*stat) in both modes: native = spec", None)


def _dropout_info(layer, native: bool):
    if native:
        return ("jax.random.bernoulli(fold_in(fold_in(PRNGKey(seed), step), layer index), 1 - rate); "
                "select(keep, x/(1 - rate), 0)",
                "Dropout masks from JAX's RNG (jax.random.bernoulli): trajectories not comparable")
    return "the harness's masks (dropout_masks of the step), arguments of the jitted step", None


LAYER_INFO = {BatchNorm: _bn_info, Dropout: _dropout_info}


# --------------------------------------------------------------------------------------------------- the model
class Model(ModelBase):
    capabilities = CAPABILITIES

    def __init__(self, spec: ModelSpec, weights: list[np.ndarray], options: BuildOptions) -> None:
        super().__init__(spec, weights, options)
        for layer in spec.layers:  # an unknown layer is Unsupported before any work
            lookup(LAYER_BUILDERS, layer, BACKEND)
        build_optimizer = lookup(OPTIMIZER_BUILDERS, spec.optimizer, BACKEND)
        if options.dtype == "float64" and not x64_enabled():
            raise Unsupported("float64 needs jax_enable_x64: set JAX_ENABLE_X64=1 before jax is imported "
                              "(the harness does this for --dtype float64 runs)")
        if options.device == "cuda":
            gpus = _gpus()
            if not gpus:
                raise Unsupported("no CUDA device visible to jax")
            self.device = gpus[0]
        elif options.device == "cpu":
            self.device = jax.devices("cpu")[0]
        else:
            raise Unsupported(f"device {options.device} not supported (cpu, cuda)")
        self.native = native = options.mode == "native"
        self.np_dtype = np.dtype(options.dtype)
        self.label_dtype = np.int64 if x64_enabled() else np.int32
        self.params = [jax.device_put(np.array(w, dtype=self.np_dtype), self.device) for w in weights]
        self.state = [jax.device_put(s.astype(self.np_dtype), self.device) for s in init_state(spec)]
        self.t = 0
        self.fast = bool(options.fast)
        self.random = bool(spec.random_layers)
        precision = None if native else lax.Precision.HIGHEST
        info: dict = {"jit": True, "scan": self.fast, "device": str(self.device), "x64": x64_enabled(),
                      "threads": "not settable after start-up (XLA_FLAGS); requested "
                                 f"{options.threads}" if options.threads else "XLA default",
                      "precision": "XLA default" if native else "HIGHEST"}

        optimizer = build_optimizer(spec.optimizer, native, self.np_dtype)
        self.opt_state = jax.device_put(optimizer.init(self.params), self.device)
        self.alpha_of = optimizer.alpha
        update = optimizer.update
        info["optimizer"] = optimizer.description
        diffs: list[str] = list(optimizer.native_differences)
        if native:
            loss_of_out = native_loss(spec)
            info["loss"] = {"sse": "jnp.sum((out - y)**2, -1)",
                            "binary_crossentropy": "optax.sigmoid_binary_cross_entropy",
                            "softmax_crossentropy": "optax.softmax_cross_entropy_with_integer_labels"}[spec.loss.kind]
            if spec.loss.kind != "sse":
                diffs.append(f"loss: optax's {spec.loss.kind} is already stable from logits: same as the spec")
            if options.device == "cuda":
                diffs.append("matmul/conv precision: XLA default (float32 may use TF32 on the GPU)")
        else:
            loss_of_out = aligned_loss(spec)
            info["loss"] = f"{spec.loss.kind} from logits (stable formula), {spec.loss.reduction} over the batch"
        for layer in spec.layers:
            describe = LAYER_INFO.get(type(layer))
            if describe is not None:
                note, diff = describe(layer, native)
                info[type(layer).__name__.lower()] = note
                if diff and diff not in diffs:
                    diffs.append(diff)

        # The jitted functions take everything that varies between models of one key as arguments: weights, optimizer
        # state, BatchNorm state, the step's dropout noise (aligned: the masks, one per Dropout layer; native: the
        # uint32 pair (seed, step) the key is made from) and the eps_hat Adam's alpha.
        def training_pass(noise):
            if native:
                return _Pass(True, precision, key=jax.random.fold_in(jax.random.PRNGKey(noise[0]), noise[1]))
            return _Pass(True, precision, masks=dict(zip(spec.random_layers, noise)))

        def loss_fn(params, state, x, y, noise):
            out, new_state = run(spec, params, state, x, training_pass(noise))
            return loss_of_out(out, y), new_state

        def step(params, opt_state, state, x, y, alpha, noise):
            (loss, state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, state, x, y, noise)
            params, opt_state = update(params, opt_state, grads, alpha)
            return params, opt_state, state, loss

        def steps_scan(params, opt_state, state, xs, ys, alphas, noises):
            def body(carry, inp):
                p, o, s = carry
                p, o, s, loss = step(p, o, s, *inp)
                return (p, o, s), loss

            (params, opt_state, state), losses = lax.scan(body, (params, opt_state, state), (xs, ys, alphas, noises))
            return params, opt_state, state, losses

        def gradients(params, state, x, y, noise):  # the new state is dropped: gradients() moves nothing
            (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, state, x, y, noise)
            return loss, grads

        def predict(params, state, x):
            return predict_from_output(spec, run(spec, params, state, x, _Pass(False, precision))[0])

        self.compile_s: dict = {}
        self.compile_reused: dict = {}
        shared = _SHARED.get(key := (spec, options.mode, options.dtype, str(self.device), x64_enabled()))
        if shared is None:  # the first model of this key: its functions are the ones every later model runs
            shared = _SHARED[key] = {"step": _Jitted(step), "scan": _Jitted(steps_scan),
                                     "gradients": _Jitted(gradients), "predict": _Jitted(predict)}
        self._step, self._scan, self._grads, self._predict = (
            _AOT(shared[n], n, self.compile_s, self.compile_reused) for n in ("step", "scan", "gradients", "predict"))
        if native:
            info["native_differences"] = diffs or [f"nothing differs: {info['optimizer']} and {info['loss']} compute "
                                                   "what the spec says"]
        info["compile_s"] = self.compile_s
        info["compile_reused"] = self.compile_reused  # executables compiled by an earlier model of this process
        self.info = info

    # -- the edge for data ---------------------------------------------------------------------------------------
    def _in(self, x, y=None):
        if isinstance(x, jax.Array) and (y is None or isinstance(y, jax.Array)):  # already staged by to_device
            return x if y is None else (x, y)
        x = jax.device_put(np.asarray(x, dtype=self.np_dtype), self.device)
        if y is None:
            return x
        dt = self.label_dtype if self.spec.loss.integer_labels else self.np_dtype
        return x, jax.device_put(np.asarray(y, dtype=dt), self.device)

    def to_device(self, xs, ys):
        """The batches as device arrays before any clock is read (the timing protocol's 'data in memory')."""
        if self.fast:  # lax.scan takes the whole stack
            return self._in(xs, ys)
        pairs = [self._in(x, y) for x, y in zip(xs, ys)]
        return [p[0] for p in pairs], [p[1] for p in pairs]

    def _alpha(self, t: int):
        """The hand-written eps_hat Adam's per-step scalar ``lr*sqrt(1-b2^t)/(1-b1^t)``, computed in double then cast
        once (a dummy zero for the built-in optimizers, which keep their own step count)."""
        if self.alpha_of is None:
            return np.zeros((), self.np_dtype)
        return np.asarray(self.alpha_of(t), self.np_dtype)

    def _noise(self, t: int, batch_size: int):
        """The dropout noise of training step ``t`` (updates applied before it): aligned, the harness's masks (one per
        Dropout layer, ``[]`` when none); native, the uint32 pair (seed, step) JAX's key is made from."""
        if self.native:
            return np.array([self.options.seed % 2**32, t % 2**32], np.uint32)
        return self.dropout_masks(t, batch_size) if self.random else []

    def _noises(self, t: int, k: int, batch_size: int):
        """The noise of steps t..t+k-1 stacked for lax.scan: (k, 2) keys, or per Dropout layer (k, B, ...) masks."""
        steps = [self._noise(t + j, batch_size) for j in range(k)]
        if self.native:
            return np.stack(steps)
        return [np.stack(masks) for masks in zip(*steps)] if self.random else []

    def _note_trace(self) -> None:
        if "trace_s" not in self.info:
            fn = "scan" if "scan" in self.compile_s else "step"
            self.info["trace_s"] = self.compile_s[fn][0]

    # -- training ------------------------------------------------------------------------------------------------
    def train_step(self, x, y) -> float:
        x, y = self._in(x, y)
        noise = jax.device_put(self._noise(self.t, x.shape[0]), self.device)
        self.t += 1
        alpha = jax.device_put(self._alpha(self.t), self.device)
        self.params, self.opt_state, self.state, loss = self._step(self.params, self.opt_state, self.state, x, y,
                                                                   alpha, noise)
        self._note_trace()
        return float(loss)

    def train_steps(self, xs, ys) -> np.ndarray:
        k = len(xs)
        alphas = np.stack([self._alpha(self.t + j + 1) for j in range(k)])
        if self.fast:  # the whole stack in one compiled call
            xs, ys = self._in(xs, ys)
            noises = jax.device_put(self._noises(self.t, k, xs.shape[1]), self.device)
            alphas = jax.device_put(alphas, self.device)
            self.params, self.opt_state, self.state, losses = self._scan(self.params, self.opt_state, self.state,
                                                                         xs, ys, alphas, noises)
            self.t += k
        else:  # one jitted step per batch; NumPy views go straight into the compiled step, which transfers them
            if not isinstance(xs, list):
                xs = np.asarray(xs, dtype=self.np_dtype)
                ys = np.asarray(ys, dtype=self.label_dtype if self.spec.loss.integer_labels else self.np_dtype)
            losses = []
            for j in range(k):
                noise = self._noise(self.t, xs[j].shape[0])
                self.t += 1
                self.params, self.opt_state, self.state, loss = self._step(self.params, self.opt_state, self.state,
                                                                           xs[j], ys[j], alphas[j], noise)
                losses.append(loss)
            losses = jnp.stack(losses)
        self._note_trace()
        return np.asarray(losses, dtype=np.float64)  # one host sync for the whole stack

    def gradients(self, x, y):
        """Training-mode loss and gradients at step ``t``'s dropout noise (the next train_step's); weights, optimizer
        state and BatchNorm state stay as they are."""
        x, y = self._in(x, y)
        noise = jax.device_put(self._noise(self.t, x.shape[0]), self.device)
        loss, grads = self._grads(self.params, self.state, x, y, noise)
        return float(loss), [np.array(g) for g in grads]

    def predict(self, x):
        return np.array(self._predict(self.params, self.state, self._in(x)))

    def get_weights(self):
        return [np.array(p) for p in self.params]

    def get_state(self):
        return [np.array(s) for s in self.state]

    def sync(self) -> None:
        jax.block_until_ready((self.params, self.state))
