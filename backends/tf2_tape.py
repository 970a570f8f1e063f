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

Layers and optimizers come from the tables :data:`LAYER_BUILDERS` and :data:`OPTIMIZER_BUILDERS`, looked up with
``backends.base.lookup`` when the model is built (an unknown type is ``Unsupported("tf2 has no <Type>")``).  A layer's
arrays reach its builder by their ParamSpec role (``kernel``, ``bias``, ``gamma``...), never by shape.

Training mode and state: the step and ``gradients`` run the network in training mode; ``predict`` in inference mode.
BatchNorm's moving statistics live in non-trainable ``tf.Variable`` s, assigned inside the step's ``tf.function``
(``gradients`` computes the same forward pass and assigns nothing).  Aligned BatchNorm is ``tf.nn.moments`` (the batch's
mean and biased variance) and ``tf.nn.batch_normalization`` with the spec's epsilon as a tensor of the run's dtype,
the state moved as ``moving * momentum + stat * (1 - momentum)`` in the run's dtype (the stored variance times
``n / (n - 1)`` when the spec asks for the unbiased one).  Aligned dropout multiplies by the harness's masks
(``ModelBase.dropout_masks(step, batch)``), which the step and gradient functions take as arguments with a free batch
dimension in their ``input_signature``: one trace, whatever the step or batch size.

Native mode: TensorFlow has no BatchNorm layer of its own outside Keras (``tf.nn.batch_normalization`` takes the
statistics and epsilon as arguments and has no defaults), and this backend's native mode already takes Keras'
optimizers, so native BatchNorm follows ``tf.keras.layers.BatchNormalization()``'s defaults, as Keras 3 applies them
(``keras/src/layers/normalization/batch_normalization.py``: ``momentum=0.99, epsilon=1e-3`` kept as Python floats,
``moving * 0.99 + stat * (1.0 - 0.99)``, the biased batch variance from ``tf.nn.moments``); native dropout is
``tf.nn.dropout`` with TensorFlow's own RNG.  ``info["native_differences"]`` lists what that changes against the spec.

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

from models.spec import (  # noqa: E402
    SGD,
    Activation,
    Adam,
    BatchNorm,
    Conv2D,
    Dense,
    Dropout,
    Flatten,
    MaxPool2D,
    ModelSpec,
    init_state,
)

from .base import (  # noqa: E402
    BuildOptions,
    Capabilities,
    ModelBase,
    Unsupported,
    fmt,
    lookup,
    one_minus_beta_diffs,
    value_diff,
)

CAPABILITIES = Capabilities(
    devices=("cpu", "cuda"),
    notes=("tf.keras.optimizers SGD / Adam (eps_hat) applied under tf.function; eps_v_hat Adam written with TF ops",),
)
BACKEND = "tf2"

# tf.keras.layers.BatchNormalization()'s defaults (Keras 3, keras/src/layers/normalization/batch_normalization.py:
# momentum=0.99, epsilon=1e-3, stored as Python floats; moving = moving * momentum + stat * (1.0 - momentum) with the
# biased variance of tf.nn.moments): what native mode applies
KERAS_BN_MOMENTUM = 0.99
KERAS_BN_EPSILON = 1e-3
NATIVE_DROPOUT_DIFF = "Dropout masks from TensorFlow's RNG: trajectories not comparable"

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
class Ctx:
    """What a layer builder sees: the run's dtype, training or inference mode, aligned or native, this step's aligned
    dropout masks (layer index -> tensor), and, after a training pass, the moved state (layer index -> {role: value})."""

    def __init__(self, dtype, training: bool, native: bool = False, masks: dict | None = None, seed: int = 0):
        self.dtype, self.training, self.native, self.masks, self.seed = dtype, training, native, masks or {}, seed
        self.new_state: dict[int, dict] = {}


def _act(x, kind):
    if kind == "relu":
        return tf.nn.relu(x)
    if kind == "sigmoid":
        return tf.math.sigmoid(x)
    return x


# Each builder: (ctx, layer index, layer, trainable arrays by role, state arrays by role, x) -> output; a layer that
# moves its state in training mode leaves the new values in ctx.new_state[i].
def _dense(ctx, i, layer, p, s, x):
    z = tf.matmul(x, p["kernel"])  # (N, in) @ (in, out)
    if layer.use_bias:
        z = z + p["bias"]
    return _act(z, layer.activation)


def _conv(ctx, i, layer, p, s, x):
    z = tf.nn.conv2d(x, p["kernel"], strides=1, padding="VALID")  # NHWC * HWIO -> NHWC
    if layer.use_bias:
        z = z + p["bias"]
    return _act(z, layer.activation)


def _pool(ctx, i, layer, p, s, x):
    return tf.nn.max_pool2d(x, ksize=layer.pool_size, strides=layer.pool_size, padding="VALID")


def _flatten(ctx, i, layer, p, s, x):
    return tf.reshape(x, [-1, math.prod(x.shape[1:])])  # NHWC row-major: (h, w, c) order


def _activation(ctx, i, layer, p, s, x):
    return _act(x, layer.activation)


def bessel_factor(x, dtype):
    """``n / (n - 1)`` for n values per feature of ``x`` (1 when n == 1), in float64 then cast, as the oracle has it."""
    n = tf.cast(tf.size(x) // x.shape[-1], tf.float64)
    return tf.cast(tf.where(n > 1, n / tf.maximum(n - 1, 1), tf.ones_like(n)), dtype)


def bn_aligned(ctx, i, layer, p, s, x):
    """The spec's BatchNorm with TF's own ops: ``tf.nn.moments`` (mean, biased variance) and
    ``tf.nn.batch_normalization``, every constant a tensor of the run's dtype."""
    eps = tf.constant(layer.epsilon, ctx.dtype)
    if not ctx.training:
        return tf.nn.batch_normalization(x, s["moving_mean"], s["moving_variance"], p["beta"], p["gamma"], eps)
    mean, var = tf.nn.moments(x, list(range(len(x.shape) - 1)))
    y = tf.nn.batch_normalization(x, mean, var, p["beta"], p["gamma"], eps)
    stored = var * bessel_factor(x, ctx.dtype) if layer.unbiased_moving_variance else var
    mom = tf.constant(layer.momentum, ctx.dtype)
    ctx.new_state[i] = {"moving_mean": s["moving_mean"] * mom + mean * (1 - mom),
                        "moving_variance": s["moving_variance"] * mom + stored * (1 - mom)}
    return y


def _bn_keras_defaults(ctx, i, layer, p, s, x):
    """Native: tf.keras.layers.BatchNormalization()'s defaults as Keras 3 applies them (Python-float momentum and
    epsilon, biased moving variance), whatever the spec's BatchNorm says."""
    if not ctx.training:
        return tf.nn.batch_normalization(x, s["moving_mean"], s["moving_variance"], p["beta"], p["gamma"],
                                         KERAS_BN_EPSILON)
    mean, var = tf.nn.moments(x, list(range(len(x.shape) - 1)))
    ctx.new_state[i] = {
        "moving_mean": s["moving_mean"] * KERAS_BN_MOMENTUM + mean * (1.0 - KERAS_BN_MOMENTUM),
        "moving_variance": s["moving_variance"] * KERAS_BN_MOMENTUM + var * (1.0 - KERAS_BN_MOMENTUM)}
    return tf.nn.batch_normalization(x, mean, var, p["beta"], p["gamma"], KERAS_BN_EPSILON)


def _batchnorm(ctx, i, layer, p, s, x):
    return (_bn_keras_defaults if ctx.native else bn_aligned)(ctx, i, layer, p, s, x)


def _dropout(ctx, i, layer, p, s, x):
    if not ctx.training or layer.rate == 0:
        return x
    if ctx.native:  # TensorFlow's own dropout and RNG (op seed from the run's seed and the layer)
        return tf.nn.dropout(x, rate=layer.rate, seed=ctx.seed * 1000 + i)
    return x * ctx.masks[i]  # the harness's mask: 0 or 1 / (1 - rate)


LAYER_BUILDERS = {
    Dense: _dense,
    Conv2D: _conv,
    MaxPool2D: _pool,
    Flatten: _flatten,
    Activation: _activation,
    BatchNorm: _batchnorm,
    Dropout: _dropout,
}


def forward(spec: ModelSpec, params, x, ctx: Ctx, state=(), table=None, backend: str = BACKEND):
    """Network output (logits for the cross-entropies); ``params`` / ``state`` in canonical order and layout.  In
    training mode the moved state is left in ``ctx.new_state``; :func:`new_state` lists it in canonical order."""
    table = LAYER_BUILDERS if table is None else table
    for i, (layer, (lp, ls)) in enumerate(zip(spec.layers, spec.by_layer(params, state))):
        x = lookup(table, layer, backend)(ctx, i, layer, lp, ls, x)
    return x


def new_state(spec: ModelSpec, ctx: Ctx, state):
    """The state after a training pass, in ``spec.state_names()`` order: moved where a layer moved it, else as is."""
    it = iter(state)
    out = []
    for i, _, e in spec.state_entries():
        cur = next(it)
        out.append(ctx.new_state.get(i, {}).get(e.role, cur))
    return out


def native_bn_diffs(spec: ModelSpec, dtype: str, used) -> list[str]:
    """What a native BatchNorm changes against each spec BatchNorm: ``used(layer, in_shape)`` returns (momentum,
    1 - momentum, epsilon, unbiased, note) as the framework applies them."""
    out = []
    shapes = spec.input_shapes()
    for i in sorted({i for i, _, e in spec.state_entries() if e.role == "moving_variance"}):
        layer = spec.layers[i]
        mom, decay, eps, unbiased, note = used(layer, shapes[i])
        what = f"BatchNorm (layer {i})"
        out += [value_diff(f"{what} momentum", mom, layer.momentum, dtype, note),
                value_diff(f"{what} 1 - momentum", decay, 1.0 - layer.momentum, dtype, note),
                value_diff(f"{what} epsilon", eps, layer.epsilon, dtype, note)]
        if unbiased != layer.unbiased_moving_variance:
            kind = {True: "unbiased (n/(n-1))", False: "biased"}
            out.append(f"{what} moving variance {kind[unbiased]} (spec {kind[layer.unbiased_moving_variance]}){note}")
    return [d for d in out if d]


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
    names = [n for n in ("lr", "beta1", "beta2", "epsilon") if hasattr(opt, n)]
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


# --------------------------------------------------------------------------------------------------- optimizers
# optimizer type -> builder(model, opt): sets model.keras_opt (or the hand-written Adam's variables) and
# info["optimizer"]; in native mode returns what differs from the spec
def _sgd(model, opt):
    if model.native:  # what a TF2 tutorial writes: the learning rate only
        model.keras_opt = tf.keras.optimizers.SGD(learning_rate=opt.lr)
        model.info["optimizer"] = f"built-in keras.optimizers.SGD; tf.keras.optimizers.SGD(learning_rate={fmt(opt.lr)})"
        model.keras_opt.build(model.params)  # its slots exist before tracing
        return model.native_lr_diffs(opt)
    lr = tf.constant(opt.lr, dtype=model.dtype, name="lr")
    model.keras_opt = tf.keras.optimizers.SGD(learning_rate=lambda: lr)
    model.info["optimizer"] = (f"built-in keras.optimizers.SGD; via tf.keras, learning rate a {model.options.dtype} "
                               "tensor")
    model.keras_opt.build(model.params)
    return []


def _adam(model, opt):
    dt = model.options.dtype
    if model.native:
        model.keras_opt = k = tf.keras.optimizers.Adam(learning_rate=opt.lr)
        model.info["optimizer"] = (f"built-in keras.optimizers.Adam; tf.keras.optimizers.Adam(learning_rate="
                                   f"{fmt(opt.lr)}), defaults otherwise")
        k.build(model.params)
        diffs = model.native_lr_diffs(opt)
        diffs += [value_diff("Adam epsilon", float(k.epsilon), opt.epsilon, dt),
                  value_diff("Adam beta_1", float(k.beta_1), opt.beta1, dt, " (a Python double)"),
                  value_diff("Adam beta_2", float(k.beta_2), opt.beta2, dt, " (a Python double)")]
        diffs += one_minus_beta_diffs({"beta_1": k.beta_1, "beta_2": k.beta_2}, opt, dt)
        if opt.convention != "eps_hat":
            diffs.append(f"Adam epsilon convention eps_hat (spec {opt.convention})")
        return diffs
    if opt.convention != "eps_hat":  # Keras' Adam adds a constant eps to sqrt(v): write the other form with TF ops
        model.hp = hyper(opt, model.dtype)
        model.t = tf.Variable(0, dtype=tf.int64, name="t")
        model.m = [tf.Variable(tf.zeros_like(p), name="m") for p in model.params]
        model.v = [tf.Variable(tf.zeros_like(p), name="v") for p in model.params]
        model.info["optimizer"] = (f"hand-written, spec convention ({opt.convention}); keras.optimizers.Adam adds a "
                                   "constant eps to sqrt(v) (eps_hat) only")
        return []
    lr = tf.constant(opt.lr, dtype=model.dtype, name="lr")
    model.keras_opt = tf.keras.optimizers.Adam(learning_rate=lambda: lr, beta_1=opt.beta1, beta_2=opt.beta2,
                                               epsilon=opt.epsilon)
    model.info["optimizer"] = f"built-in keras.optimizers.Adam; via tf.keras, learning rate a {dt} tensor"
    model.keras_opt.build(model.params)  # its slots exist before tracing
    return []


OPTIMIZER_BUILDERS = {SGD: _sgd, Adam: _adam}


def _keras_bn_used(dtype):
    def used(layer, shape):
        return (KERAS_BN_MOMENTUM, 1.0 - KERAS_BN_MOMENTUM, KERAS_BN_EPSILON, False,
                " (tf.keras.layers.BatchNormalization() default, a Python float)")
    return used


# ------------------------------------------------------------------------------------------------------- the model
class Model(ModelBase):
    capabilities = CAPABILITIES

    def __init__(self, spec: ModelSpec, weights: list[np.ndarray], options: BuildOptions) -> None:
        super().__init__(spec, weights, options)
        for layer in spec.layers:  # every layer and the optimizer from the tables, before any work
            lookup(LAYER_BUILDERS, layer, BACKEND)
        build_optimizer = lookup(OPTIMIZER_BUILDERS, spec.optimizer, BACKEND)
        if options.device not in devices():
            raise Unsupported(f"device {options.device} not available to TensorFlow (has {devices()})")
        set_threads(options.threads)
        self.np_dtype = np.dtype(options.dtype)
        self.dtype = tf.as_dtype(self.np_dtype)
        self.device = tf_device(options.device)
        self.native = options.mode == "native"
        self.updates = 0  # updates applied so far: the step whose dropout masks the next pass uses
        self.keras_opt = None
        self.info = {**environment_info(), "device": self.device, "threads": options.threads}
        with tf.device(self.device):
            self.params = [tf.Variable(np.asarray(w, self.np_dtype), name=n)
                           for w, n in zip(weights, spec.param_names())]
            self.state = [tf.Variable(np.asarray(s, self.np_dtype), name=n, trainable=False)
                          for s, n in zip(init_state(spec), spec.state_names())]
            diffs = build_optimizer(self, spec.optimizer)
        self.info["loss"] = "tf.nn ops on logits (stable formula)" if spec.loss.kind != "sse" else "sum of squares"
        if spec.state_entries():
            self.info["batchnorm"] = (
                "native: tf.keras.layers.BatchNormalization() defaults (momentum 0.99, epsilon 1e-3 as Python floats, "
                "biased moving variance) with tf.nn.moments / tf.nn.batch_normalization; tf.nn.batch_normalization has "
                "no defaults of its own and native mode already takes Keras' optimizers" if self.native else
                "tf.nn.moments + tf.nn.batch_normalization, spec momentum/epsilon as run-dtype tensors; state in "
                "tf.Variables assigned inside the step")
            if self.native:
                diffs += native_bn_diffs(spec, options.dtype, _keras_bn_used(options.dtype))
        if spec.random_layers:
            self.info["dropout"] = ("native: tf.nn.dropout, TensorFlow's RNG" if self.native else
                                    "the harness's masks, step-function arguments (free batch dimension)")
            if self.native:
                diffs.append(NATIVE_DROPOUT_DIFF)
        if self.native:
            self.info["native_differences"] = [d for d in diffs if d]

        x_sig = tf.TensorSpec([None, *spec.input_shape], self.dtype, name="x")
        y_sig = label_spec(spec, self.dtype)
        shapes = spec.input_shapes()
        self.n_masks = 0 if self.native else len(spec.random_layers)
        mask_sigs = [tf.TensorSpec([None, *shapes[i]], self.dtype, name=f"mask{i}")
                     for i in spec.random_layers][:self.n_masks]
        jit = bool(options.fast)
        self._step = tf.function(self._step_py, input_signature=[x_sig, y_sig, *mask_sigs], jit_compile=jit)
        self._grads = tf.function(self._grads_py, input_signature=[x_sig, y_sig, *mask_sigs], jit_compile=jit)
        self._predict = tf.function(self._predict_py, input_signature=[x_sig], jit_compile=jit)
        t0 = time.perf_counter()
        with tf.device(self.device):
            self._step.get_concrete_function()  # trace once, up front, measured apart from the steps
        self.info.update(traced=True, trace_s=time.perf_counter() - t0, jit_compile=jit,
                         step_function="tf.function(jit_compile=True) (XLA)" if jit else "tf.function (no XLA)")

    def native_lr_diffs(self, opt) -> list:
        lr_var = self.keras_opt.learning_rate
        lr_dtype = np.dtype(getattr(lr_var, "dtype", "float64"))
        lr_used = float(np.asarray(lr_var, dtype=lr_dtype))
        return [value_diff("learning rate", lr_used, opt.lr, self.options.dtype,
                           f" (tf.keras keeps it in a {lr_dtype} variable: floatx is {tf.keras.backend.floatx()})")]

    # -- traced bodies ----------------------------------------------------------------------------------------------
    def _ctx(self, training, masks=()):
        return Ctx(self.dtype, training, self.native, dict(zip(self.spec.random_layers, masks)), self.options.seed)

    def _loss_and_grads(self, x, y, masks):
        ctx = self._ctx(True, masks)
        with tf.GradientTape() as tape:
            loss = loss_fn(self.spec, forward(self.spec, self.params, x, ctx, self.state), y)
        return loss, tape.gradient(loss, self.params), new_state(self.spec, ctx, self.state)

    def _step_py(self, x, y, *masks):
        loss, grads, state = self._loss_and_grads(x, y, masks)
        for var, value in zip(self.state, state):  # BatchNorm's moving statistics, from this step's batch
            var.assign(value)
        if self.keras_opt is not None:
            self.keras_opt.apply_gradients(zip(grads, self.params))
        else:  # eps_v_hat Adam, written with TF ops
            adam_update(self.params, grads, self.m, self.v, self.t, self.hp, self.spec.optimizer.convention)
        return loss  # computed before the update

    def _grads_py(self, x, y, *masks):
        loss, grads, _ = self._loss_and_grads(x, y, masks)  # the moved state is dropped: gradients() changes nothing
        return loss, grads

    def _predict_py(self, x):
        return predict_fn(self.spec, forward(self.spec, self.params, x, self._ctx(False), self.state))

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

    def _masks(self, batch_size):
        """This step's aligned dropout masks (none in native mode, where tf.nn.dropout draws its own)."""
        if not self.n_masks:
            return []
        return [tf.constant(m) for m in self.dropout_masks(self.updates, batch_size)]

    def _train(self, x, y):
        x, y = self._in(x, y)
        loss = self._step(x, y, *self._masks(int(x.shape[0])))
        self.updates += 1
        return loss

    def train_step(self, x, y):
        with tf.device(self.device):
            return float(self._train(x, y))

    def train_steps(self, xs, ys):
        with tf.device(self.device):
            losses = [self._train(x, y) for x, y in zip(xs, ys)]
        self.info["tracing_count"] = self._step.experimental_get_tracing_count()  # stays 1: never retraced
        return np.array([float(v) for v in losses], dtype=np.float64)

    def gradients(self, x, y):
        with tf.device(self.device):
            x, y = self._in(x, y)
            loss, grads = self._grads(x, y, *self._masks(int(x.shape[0])))
        return float(loss), [g.numpy() for g in grads]

    def predict(self, x):
        with tf.device(self.device):
            return self._predict(tf.constant(np.asarray(x, self.np_dtype))).numpy()

    def get_weights(self):
        return [p.numpy().copy() for p in self.params]

    def get_state(self):
        return [s.numpy().copy() for s in self.state]

    def sync(self):
        if self.options.device == "cuda":  # CPU ops are synchronous; GPU kernels are queued
            tf.test.experimental.sync_devices()
