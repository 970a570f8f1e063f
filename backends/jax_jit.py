"""Pure JAX: parameters as a list of arrays, the whole train step (loss, grad, update) under ``jax.jit``.

Layouts are the canonical ones as they are: ``jnp.dot`` on ``(in, out)`` kernels, ``lax.conv_general_dilated`` with
``('NHWC', 'HWIO', 'NHWC')``, flatten of NHWC in (h, w, c) order: no conversion anywhere.

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
logits, like the spec), XLA's default matmul precision.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from models.spec import SGD, Adam, Conv2D, Dense, Flatten, MaxPool2D, ModelSpec

from .base import BuildOptions, Capabilities, ModelBase, Unsupported

CAPABILITIES = Capabilities(
    devices=("cpu", "cuda"),
    notes=("canonical layout as is (NHWC/HWIO); whole step under jax.jit; fast mode = lax.scan over the batches",
           "float64 needs JAX_ENABLE_X64=1 before jax is imported (the harness sets it)"),
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


def forward(spec: ModelSpec, params, x, precision=None):
    """Network output (logits for the cross-entropies); canonical layout throughout."""
    k = 0
    for layer in spec.layers:
        if isinstance(layer, Dense):
            w, b = params[k], params[k + 1]
            k += 2
            x = _act(jnp.dot(x, w, precision=precision) + b, layer.activation)
        elif isinstance(layer, Conv2D):
            w, b = params[k], params[k + 1]
            k += 2
            z = lax.conv_general_dilated(x, w, window_strides=(1, 1), padding="VALID",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=precision)
            x = _act(z + b, layer.activation)
        elif isinstance(layer, MaxPool2D):
            p = layer.pool_size
            x = lax.reduce_window(x, -jnp.inf, lax.max, (1, p, p, 1), (1, p, p, 1), "VALID")
        elif isinstance(layer, Flatten):
            x = x.reshape(x.shape[0], -1)  # NHWC -> (h, w, c) order
    return x


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


# --------------------------------------------------------------------------------------------------- the model
class Model(ModelBase):
    capabilities = CAPABILITIES

    def __init__(self, spec: ModelSpec, weights: list[np.ndarray], options: BuildOptions) -> None:
        super().__init__(spec, weights, options)
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
        self.native = options.mode == "native"
        self.np_dtype = np.dtype(options.dtype)
        self.label_dtype = np.int64 if x64_enabled() else np.int32
        self.params = [jax.device_put(np.array(w, dtype=self.np_dtype), self.device) for w in weights]
        self.t = 0
        self.fast = bool(options.fast)
        precision = None if self.native else lax.Precision.HIGHEST
        dt = self.np_dtype.type
        opt = spec.optimizer
        diffs: list[str] = []
        info: dict = {"jit": True, "scan": self.fast, "device": str(self.device), "x64": x64_enabled(),
                      "threads": "not settable after start-up (XLA_FLAGS); requested "
                                 f"{options.threads}" if options.threads else "XLA default",
                      "precision": "XLA default" if self.native else "HIGHEST"}

        self.builtin_opt = self.native or isinstance(opt, SGD) or opt.convention == "eps_v_hat"
        if self.builtin_opt:
            try:
                import optax
            except ImportError:
                raise Unsupported("optax is not installed (the built-in optimizers): pip install '.[jax]'") from None
            if isinstance(opt, SGD):
                tx = optax.sgd(opt.lr)
                info["optimizer"] = "built-in optax.sgd"
            elif self.native:
                tx = optax.adam(opt.lr, b1=opt.beta1, b2=opt.beta2)
                info["optimizer"] = "built-in optax.adam; optax's defaults (eps=1e-08, eps_v_hat)"
            else:  # eps_v_hat: what optax.adam computes, with the spec's eps
                tx = optax.adam(opt.lr, b1=opt.beta1, b2=opt.beta2, eps=opt.epsilon)
                info["optimizer"] = "built-in optax.adam"
            self.opt_state = jax.device_put(tx.init(self.params), self.device)

            def update(params, state, grads, alpha):
                del alpha
                upd, state = tx.update(grads, state, params)
                return optax.apply_updates(params, upd), state

        if self.native:
            loss_of_out = native_loss(spec)
            info["loss"] = {"sse": "jnp.sum((out - y)**2, -1)",
                            "binary_crossentropy": "optax.sigmoid_binary_cross_entropy",
                            "softmax_crossentropy": "optax.softmax_cross_entropy_with_integer_labels"}[spec.loss.kind]
            if isinstance(opt, Adam) and not (opt.convention == "eps_v_hat" and opt.epsilon == 1e-8):
                diffs.append(f"Adam: optax.adam default eps=1e-08 added to sqrt(v_hat) (spec: eps={opt.epsilon:g}, "
                             f"{opt.convention} convention)")
            if spec.loss.kind != "sse":
                diffs.append(f"loss: optax's {spec.loss.kind} is already stable from logits: same as the spec")
            if options.device == "cuda":
                diffs.append("matmul/conv precision: XLA default (float32 may use TF32 on the GPU)")
        else:
            loss_of_out = aligned_loss(spec)
            info["loss"] = f"{spec.loss.kind} from logits (stable formula), {spec.loss.reduction} over the batch"
        if not self.builtin_opt:  # aligned Adam, eps_hat: optax has no constant-eps form of it
            b1c, b2c, eps = dt(1.0 - opt.beta1), dt(1.0 - opt.beta2), dt(opt.epsilon)
            zeros = [np.zeros(p.shape, self.np_dtype) for p in self.params]
            self.opt_state = jax.device_put((zeros, [z.copy() for z in zeros]), self.device)
            info["optimizer"] = (f"hand-written, spec convention ({opt.convention}); optax.adam adds a constant eps "
                                 "to sqrt(v_hat) (eps_v_hat)")

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

        def loss_fn(params, x, y):
            return loss_of_out(forward(spec, params, x, precision), y)

        def step(params, state, x, y, alpha):
            loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
            params, state = update(params, state, grads, alpha)
            return params, state, loss

        def steps_scan(params, state, xs, ys, alphas):
            def body(carry, inp):
                p, s = carry
                p, s, loss = step(p, s, *inp)
                return (p, s), loss

            (params, state), losses = lax.scan(body, (params, state), (xs, ys, alphas))
            return params, state, losses

        self.compile_s: dict = {}
        self.compile_reused: dict = {}
        shared = _SHARED.get(key := (spec, options.mode, options.dtype, str(self.device), x64_enabled()))
        if shared is None:  # the first model of this key: its functions are the ones every later model runs
            shared = _SHARED[key] = {
                "step": _Jitted(step), "scan": _Jitted(steps_scan), "gradients": _Jitted(jax.value_and_grad(loss_fn)),
                "predict": _Jitted(lambda params, x: predict_from_output(spec, forward(spec, params, x, precision)))}
        self._step, self._scan, self._grads, self._predict = (
            _AOT(shared[n], n, self.compile_s, self.compile_reused) for n in ("step", "scan", "gradients", "predict"))
        if self.native:
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
        opt = self.spec.optimizer
        if self.builtin_opt:
            return np.zeros((), self.np_dtype)
        b1t, b2t = opt.beta1**t, opt.beta2**t
        return np.asarray(opt.lr * np.sqrt(1.0 - b2t) / (1.0 - b1t), self.np_dtype)

    def _note_trace(self) -> None:
        if "trace_s" not in self.info:
            fn = "scan" if "scan" in self.compile_s else "step"
            self.info["trace_s"] = self.compile_s[fn][0]

    # -- training ------------------------------------------------------------------------------------------------
    def train_step(self, x, y) -> float:
        self.t += 1
        x, y = self._in(x, y)
        alpha = jax.device_put(self._alpha(self.t), self.device)
        self.params, self.opt_state, loss = self._step(self.params, self.opt_state, x, y, alpha)
        self._note_trace()
        return float(loss)

    def train_steps(self, xs, ys) -> np.ndarray:
        alphas = np.stack([self._alpha(self.t + k + 1) for k in range(len(xs))])
        if self.fast:  # the whole stack in one compiled call
            xs, ys = self._in(xs, ys)
            alphas = jax.device_put(alphas, self.device)
            self.params, self.opt_state, losses = self._scan(self.params, self.opt_state, xs, ys, alphas)
            self.t += len(xs)
        else:  # one jitted step per batch; NumPy views go straight into the compiled step, which transfers them
            if not isinstance(xs, list):
                xs = np.asarray(xs, dtype=self.np_dtype)
                ys = np.asarray(ys, dtype=self.label_dtype if self.spec.loss.integer_labels else self.np_dtype)
            losses = []
            for k in range(len(xs)):
                self.t += 1
                self.params, self.opt_state, loss = self._step(self.params, self.opt_state, xs[k], ys[k], alphas[k])
                losses.append(loss)
            losses = jnp.stack(losses)
        self._note_trace()
        return np.asarray(losses, dtype=np.float64)  # one host sync for the whole stack

    def gradients(self, x, y):
        loss, grads = self._grads(self.params, *self._in(x, y))
        return float(loss), [np.array(g) for g in grads]

    def predict(self, x):
        return np.array(self._predict(self.params, self._in(x)))

    def get_weights(self):
        return [np.array(p) for p in self.params]

    def sync(self) -> None:
        jax.block_until_ready(self.params)
