"""TF2: eager ``tf.GradientTape``, the whole training step under one ``tf.function`` (traced once, never retraced).

Layouts: TensorFlow's own are the canonical ones (dense ``(in, out)``, conv HWIO via ``tf.nn.conv2d`` NHWC, flatten in
(h, w, c) order), so weights go in and come out as they are: no conversion anywhere.

Aligned mode: the losses from logits with the fused stable ops (``sigmoid_cross_entropy_with_logits``,
``sparse_softmax_cross_entropy_with_logits``) and the optimizers TF2 code uses, applied with ``apply_gradients``:
the built-in ``tf.keras.optimizers.SGD`` (Keras 3's ``keras.optimizers.SGD``: ``w -= g * lr``) and, for the spec's
``eps_hat`` convention, the built-in ``tf.keras.optimizers.Adam(learning_rate, beta_1, beta_2, epsilon)``, whose
update (``keras/src/optimizers/adam.py``) *is* the eps_hat form in the oracle's order: ``m += (g - m) * (1 - b1)``,
``v += (g*g - v) * (1 - b2)``, ``w -= (m * alpha) / (sqrt(v) + eps)`` with ``alpha = lr * sqrt(1 - b2^t) / (1 - b1^t)``,
the powers taken in the variable's dtype.  The learning rate is given as a callable returning a tensor of the run's
dtype: a float would live in a floatx (float32) variable, and SGD's 0.1 would become 0.10000000149 in a float64 run.
Keras' Adam has no ``eps_v_hat`` form (eps is added to ``sqrt(v)``, not ``sqrt(v_hat)``, and is a constant), so a spec
asking for it gets the update written with TF ops (:func:`adam_update`).  ``info["optimizer"]`` says which ran:
``"built-in keras.optimizers.Adam"`` or ``"hand-written, spec convention (eps_v_hat)"``.
Native mode keeps the losses (``tf.nn`` on logits is what TF2 code writes) and the same Keras optimizers, called as TF2
tutorials call them: learning rate only, the defaults otherwise (Adam's epsilon 1e-7, Python-double betas).

Quirks: a ``tf.function`` called with NumPy arrays of a new shape retraces (~55 ms a call); an ``input_signature``
with a free batch dimension avoids that.  Threads can only be set before TensorFlow's runtime starts.

The op builders here (:func:`forward`, :func:`loss_fn`, :func:`predict_fn`, :func:`adam_update`) work both eagerly and
in a TF1 graph; ``backends.tf1_graph`` reuses them.
"""

from __future__ import annotations

import math
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from models.spec import SGD, Adam, Conv2D, Dense, Flatten, MaxPool2D, ModelSpec  # noqa: E402

from .base import BuildOptions, Capabilities, ModelBase, Unsupported, fmt, one_minus_beta_diffs, value_diff  # noqa: E402

CAPABILITIES = Capabilities(
    devices=("cpu", "cuda"),
    notes=("tf.keras.optimizers SGD / Adam (eps_hat) applied under tf.function; eps_v_hat Adam written with TF ops",),
)




def probe() -> str:
    return tf.__version__


def devices() -> list[str]:
    return ["cpu"] + (["cuda"] if tf.config.list_physical_devices("GPU") else [])


def tf_device(device: str) -> str:
    return "/GPU:0" if device == "cuda" else "/CPU:0"


def set_threads(threads: int | None) -> None:
    """Pin intra- and inter-op threads; only possible before the runtime starts (the first op)."""
    if not threads:
        return
    th = tf.config.threading
    if th.get_intra_op_parallelism_threads() == threads and th.get_inter_op_parallelism_threads() == threads:
        return
    try:
        th.set_intra_op_parallelism_threads(threads)
        th.set_inter_op_parallelism_threads(threads)
    except RuntimeError as e:
        raise Unsupported(f"cannot set {threads} threads: TensorFlow's runtime already started ({e})") from None


def environment_info() -> dict:
    return {"tf_version": tf.__version__,
            "TF_ENABLE_ONEDNN_OPTS": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "unset (oneDNN on by default on x86)")}


# ------------------------------------------------------------------------------------------ op builders (TF1 + TF2)
def _act(x, kind):
    if kind == "relu":
        return tf.nn.relu(x)
    if kind == "sigmoid":
        return tf.math.sigmoid(x)
    return x


def forward(spec: ModelSpec, params, x):
    """Network output (logits for the cross-entropies); ``params`` in canonical order and layout."""
    k = 0
    for layer, shape in zip(spec.layers, spec.shapes()):
        if isinstance(layer, Dense):
            x = _act(tf.matmul(x, params[k]) + params[k + 1], layer.activation)  # (N, in) @ (in, out)
            k += 2
        elif isinstance(layer, Conv2D):
            z = tf.nn.conv2d(x, params[k], strides=1, padding="VALID")  # NHWC * HWIO -> NHWC
            x = _act(z + params[k + 1], layer.activation)
            k += 2
        elif isinstance(layer, MaxPool2D):
            p = layer.pool_size
            x = tf.nn.max_pool2d(x, ksize=p, strides=p, padding="VALID")
        elif isinstance(layer, Flatten):
            x = tf.reshape(x, [-1, math.prod(shape)])  # NHWC row-major: (h, w, c) order
        else:  # pragma: no cover - the spec rejects unknown layers
            raise TypeError(type(layer).__name__)
    return x


def loss_fn(spec: ModelSpec, out, y):
    """The spec's loss from the last layer's output (logits for the cross-entropies), reduced over the batch."""
    kind = spec.loss.kind
    if kind == "sse":
        per_sample = tf.reduce_sum(tf.square(out - y), axis=-1)
    elif kind == "binary_crossentropy":  # max(z,0) - z*y + log1p(exp(-|z|)), mean over the output units
        per_sample = tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(labels=y, logits=out), axis=-1)
    else:
        per_sample = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=out)
    return tf.reduce_mean(per_sample) if spec.loss.reduction == "mean" else tf.reduce_sum(per_sample)


def predict_fn(spec: ModelSpec, out):
    pred = spec.loss.prediction
    if pred == "sigmoid":
        return tf.math.sigmoid(out)
    if pred == "softmax":
        return tf.nn.softmax(out)
    return out


def hyper(opt, dtype):
    """The optimizer's hyperparameters as tensors of the run's dtype (a Python float would become float32)."""
    names = ("lr",) if isinstance(opt, SGD) else ("lr", "beta1", "beta2", "epsilon")
    return {n: tf.constant(getattr(opt, n), dtype=dtype, name=n) for n in names}


def adam_update(params, grads, m, v, t, hp, convention):
    """One Adam step written with TF ops; returns the update ops (graph mode) / tensors.

    Uses the values returned by ``assign_add`` so that it is ordered correctly in a TF1 graph as well as under
    ``tf.function``.  ``t`` is an integer step counter variable (0 before the first step).
    """
    lr, b1, b2, eps = hp["lr"], hp["beta1"], hp["beta2"], hp["epsilon"]
    step = tf.cast(t.assign_add(1), lr.dtype)
    b1t, b2t = tf.pow(b1, step), tf.pow(b2, step)
    alpha = lr * tf.sqrt(1 - b2t) / (1 - b1t)
    updates = []
    for p, g, mi, vi in zip(params, grads, m, v):
        m_new = mi.assign_add((g - mi) * (1 - b1))
        v_new = vi.assign_add((g * g - vi) * (1 - b2))
        if convention == "eps_hat":
            delta = (m_new * alpha) / (tf.sqrt(v_new) + eps)
        else:  # eps_v_hat: eps added to sqrt(v_hat) (torch / optax)
            delta = lr * (m_new / (1 - b1t)) / (tf.sqrt(v_new / (1 - b2t)) + eps)
        updates.append(p.assign_sub(delta))
    return updates


def label_spec(spec: ModelSpec, dtype):
    if spec.loss.integer_labels:
        return tf.TensorSpec([None], tf.int64, name="y")
    return tf.TensorSpec([None, *spec.output_shape], dtype, name="y")


# ------------------------------------------------------------------------------------------------------- the model
class Model(ModelBase):
    capabilities = CAPABILITIES

    def __init__(self, spec: ModelSpec, weights: list[np.ndarray], options: BuildOptions) -> None:
        super().__init__(spec, weights, options)
        if options.device not in devices():
            raise Unsupported(f"device {options.device} not available to TensorFlow (has {devices()})")
        set_threads(options.threads)
        self.np_dtype = np.dtype(options.dtype)
        self.dtype = tf.as_dtype(self.np_dtype)
        self.device = tf_device(options.device)
        opt = spec.optimizer
        self.info = {**environment_info(), "device": self.device, "threads": options.threads}
        with tf.device(self.device):
            self.params = [tf.Variable(np.asarray(w, self.np_dtype), name=n)
                           for w, n in zip(weights, spec.param_names())]
            self.keras_opt = None
            if options.mode == "native":
                self._build_native_optimizer(opt)
            elif isinstance(opt, Adam) and opt.convention != "eps_hat":
                self.hp = hyper(opt, self.dtype)
                self.t = tf.Variable(0, dtype=tf.int64, name="t")
                self.m = [tf.Variable(tf.zeros_like(p), name="m") for p in self.params]
                self.v = [tf.Variable(tf.zeros_like(p), name="v") for p in self.params]
                self.info["optimizer"] = (f"hand-written, spec convention ({opt.convention}); keras.optimizers.Adam "
                                          "adds a constant eps to sqrt(v) (eps_hat) only")
            else:
                self._build_aligned_optimizer(opt)
        self.info["loss"] = "tf.nn ops on logits (stable formula)" if spec.loss.kind != "sse" else "sum of squares"

        x_sig = tf.TensorSpec([None, *spec.input_shape], self.dtype, name="x")
        y_sig = label_spec(spec, self.dtype)
        jit = bool(options.fast)
        self._step = tf.function(self._step_py, input_signature=[x_sig, y_sig], jit_compile=jit)
        self._grads = tf.function(self._grads_py, input_signature=[x_sig, y_sig], jit_compile=jit)
        self._predict = tf.function(self._predict_py, input_signature=[x_sig], jit_compile=jit)
        t0 = time.perf_counter()
        with tf.device(self.device):
            self._step.get_concrete_function()  # trace once, up front, measured apart from the steps
        self.info.update(traced=True, trace_s=time.perf_counter() - t0, jit_compile=jit,
                         step_function="tf.function(jit_compile=True) (XLA)" if jit else "tf.function (no XLA)")

    def _build_aligned_optimizer(self, opt) -> None:
        """Keras' own SGD / Adam (eps_hat) with the spec's hyperparameters; the learning rate a tensor of the run's
        dtype, returned by a callable (a float would become a floatx variable: float32 in a float64 run)."""
        lr = tf.constant(opt.lr, dtype=self.dtype, name="lr")
        if isinstance(opt, Adam):
            self.keras_opt = tf.keras.optimizers.Adam(learning_rate=lambda: lr, beta_1=opt.beta1, beta_2=opt.beta2,
                                                      epsilon=opt.epsilon)
            self.info["optimizer"] = "built-in keras.optimizers.Adam"
        else:
            self.keras_opt = tf.keras.optimizers.SGD(learning_rate=lambda: lr)
            self.info["optimizer"] = "built-in keras.optimizers.SGD"
        self.info["optimizer"] += f"; via tf.keras, learning rate a {self.options.dtype} tensor"
        self.keras_opt.build(self.params)  # its slots exist before tracing

    def _build_native_optimizer(self, opt) -> None:
        """What a TF2 tutorial writes: ``tf.keras.optimizers`` with their defaults, ``apply_gradients``."""
        dt = self.options.dtype
        if isinstance(opt, Adam):
            self.keras_opt = tf.keras.optimizers.Adam(learning_rate=opt.lr)
            self.info["optimizer"] = (f"built-in keras.optimizers.Adam; tf.keras.optimizers.Adam(learning_rate="
                                      f"{fmt(opt.lr)}), defaults otherwise")
        else:
            self.keras_opt = tf.keras.optimizers.SGD(learning_rate=opt.lr)
            self.info["optimizer"] = f"built-in keras.optimizers.SGD; tf.keras.optimizers.SGD(learning_rate={fmt(opt.lr)})"
        self.keras_opt.build(self.params)  # its slots exist before tracing
        lr_var = self.keras_opt.learning_rate
        lr_dtype = np.dtype(getattr(lr_var, "dtype", "float64"))
        lr_used = float(np.asarray(lr_var, dtype=lr_dtype))
        diffs = [value_diff("learning rate", lr_used, opt.lr, dt,
                            f" (tf.keras keeps it in a {lr_dtype} variable: floatx is {tf.keras.backend.floatx()})")]
        if isinstance(opt, Adam):
            k = self.keras_opt
            diffs += [value_diff("Adam epsilon", float(k.epsilon), opt.epsilon, dt),
                      value_diff("Adam beta_1", float(k.beta_1), opt.beta1, dt, " (a Python double)"),
                      value_diff("Adam beta_2", float(k.beta_2), opt.beta2, dt, " (a Python double)")]
            diffs += one_minus_beta_diffs({"beta_1": k.beta_1, "beta_2": k.beta_2}, opt, dt)
            if opt.convention != "eps_hat":
                diffs.append(f"Adam epsilon convention eps_hat (spec {opt.convention})")
        self.info["native_differences"] = [d for d in diffs if d]

    # -- traced bodies ----------------------------------------------------------------------------------------------
    def _loss_and_grads(self, x, y):
        with tf.GradientTape() as tape:
            loss = loss_fn(self.spec, forward(self.spec, self.params, x), y)
        return loss, tape.gradient(loss, self.params)

    def _step_py(self, x, y):
        loss, grads = self._loss_and_grads(x, y)
        if self.keras_opt is not None:
            self.keras_opt.apply_gradients(zip(grads, self.params))
        else:  # eps_v_hat Adam, written with TF ops
            adam_update(self.params, grads, self.m, self.v, self.t, self.hp, self.spec.optimizer.convention)
        return loss  # computed before the update

    def _grads_py(self, x, y):
        return self._loss_and_grads(x, y)

    def _predict_py(self, x):
        return predict_fn(self.spec, forward(self.spec, self.params, x))

    # -- the contract -----------------------------------------------------------------------------------------------
    def to_device(self, xs, ys):
        """The batches as tensors on the model's device, made before any clock is read."""
        with tf.device(self.device):
            pairs = [self._in(x, y) for x, y in zip(xs, ys)]
        return [p[0] for p in pairs], [p[1] for p in pairs]

    def _in(self, x, y):
        if isinstance(x, tf.Tensor) and isinstance(y, tf.Tensor):  # staged by to_device
            return x, y
        x = tf.constant(np.asarray(x, self.np_dtype))
        y = tf.constant(np.asarray(y, np.int64 if self.spec.loss.integer_labels else self.np_dtype))
        return x, y

    def train_step(self, x, y):
        with tf.device(self.device):
            return float(self._step(*self._in(x, y)))

    def train_steps(self, xs, ys):
        with tf.device(self.device):
            losses = [self._step(*self._in(x, y)) for x, y in zip(xs, ys)]
        self.info["tracing_count"] = self._step.experimental_get_tracing_count()  # stays 1: never retraced
        return np.array([float(v) for v in losses], dtype=np.float64)

    def gradients(self, x, y):
        with tf.device(self.device):
            loss, grads = self._grads(*self._in(x, y))
        return float(loss), [g.numpy() for g in grads]

    def predict(self, x):
        with tf.device(self.device):
            return self._predict(tf.constant(np.asarray(x, self.np_dtype))).numpy()

    def get_weights(self):
        return [p.numpy().copy() for p in self.params]

    def sync(self):
        if self.options.device == "cuda":  # CPU ops are synchronous; GPU kernels are queued
            tf.test.experimental.sync_devices()
