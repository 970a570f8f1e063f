"""TF2: eager ``tf.GradientTape``, the whole training step under one ``tf.function`` (traced once, never retraced).

Layouts: TensorFlow's own are the canonical ones (dense ``(in, out)``, conv HWIO via ``tf.nn.conv2d`` NHWC, flatten in
(h, w, c) order), so weights go in and come out as they are: no conversion anywhere.

Layers (:data:`LAYER_BUILDERS`, every one TensorFlow's own op computing the spec):

* Dense / Conv2D: ``tf.matmul`` / ``tf.nn.conv2d(strides, padding="SAME" | "VALID")``; TF's ``"SAME"``
  (``tensorflow/python/ops/nn_ops.py``, the windowed-output rule: ``ceil(n / s)`` outputs, the odd padding pixel at the
  bottom / right) *is* the spec's ``same_padding``, at any stride: no ``conv_same_padding`` difference.
* MaxPool2D / AveragePooling2D: ``tf.nn.max_pool2d`` / ``tf.nn.avg_pool2d(ksize, strides, padding)``; TF's ``"SAME"``
  average divides by the number of in-image values of each window (measured: a constant image averages to itself in
  the corners), which is the spec: no ``avgpool_count_pad`` difference.
* Activations: ``tf.nn.relu``, ``tf.math.sigmoid``, ``tf.math.tanh``, ``tf.nn.softmax`` (last axis),
  ``tf.nn.leaky_relu(alpha=negative_slope)`` (its ``alpha`` is a float32 attribute: the spec's float32-exact slope
  exactly); gelu written with ``tf.math.erf`` / ``tf.math.tanh`` (:func:`gelu`), because ``tf.nn.gelu`` rounds its
  constants to float32 in a float64 run (native ``gelu_approximation`` runs ``tf.nn.gelu`` itself).
* LayerNorm: ``tf.nn.moments`` over the last axis (mean, biased variance) and ``tf.nn.batch_normalization`` with the
  spec's epsilon as a tensor of the run's dtype (TensorFlow has no layer-norm op outside Keras).
* BatchNorm: ``tf.nn.moments`` and ``tf.nn.batch_normalization``, every constant a tensor of the run's dtype, the state
  moved as ``moving * momentum + stat * (1 - momentum)`` (times ``n / (n - 1)`` for the unbiased variance), assigned
  inside the step's ``tf.function`` (``gradients`` computes the same pass and assigns nothing).
* Dropout: multiplies by the harness's masks (``ModelBase.dropout_masks(step, batch)``), step-function arguments with
  a free batch dimension in the ``input_signature``: one trace, whatever the step or batch size.

Losses (:data:`LOSS_RULES`): from logits with the fused stable ops (``sigmoid_cross_entropy_with_logits``,
``sparse_softmax_cross_entropy_with_logits``); ``mse`` the mean over the last axis; ``sparse_categorical_crossentropy``
``-log(tf.gather(p, y))`` on the probabilities, unclipped; class weights gathered per sample, the weighted sum divided
by N; the L2 penalty ``l2 * sum(kernel**2)`` added to the reduced loss (so its gradient is in ``gradients``).

Optimizers (:data:`OPTIMIZER_BUILDERS`), applied after the spec's clipping (``tf.clip_by_global_norm`` /
``tf.clip_by_norm``, which compute ``g * max_norm / max(norm, max_norm)``: the spec up to rounding) with the learning
rate of update t (:func:`schedule_lr`: ``lr * factor ** (t // every)`` in float64, cast to the run's dtype, handed to
the optimizer as a callable: a Python float would live in a floatx (float32) variable).  The built-in Keras optimizer
where it computes exactly the spec, TF ops where it cannot; ``info["optimizer"]`` says which (``"built-in
keras.optimizers.X; ..."`` or ``"hand-written ..."``):

* SGD: ``tf.keras.optimizers.SGD`` (``keras/src/optimizers/sgd.py``, ``update_step``: ``m = m * mu - g * lr``,
  ``w += m``, Nesterov ``w += m * mu - g * lr``) *is* the spec's ``"velocity"`` form; the ``"accumulator"`` form
  (torch / TF1) is written with TF ops (:func:`sgd_update`).
* Adam: ``tf.keras.optimizers.Adam`` (``keras/src/optimizers/adam.py``: ``m += (g - m) * (1 - b1)``,
  ``v += (g*g - v) * (1 - b2)``, ``w -= (m * alpha) / (sqrt(v) + eps)``, ``alpha = lr * sqrt(1 - b2^t) / (1 - b1^t)``)
  is the eps_hat form in the oracle's order; eps_v_hat is written with TF ops (:func:`adam_update`).
* AdamW: ``tf.keras.optimizers.AdamW(weight_decay)``: Keras' decay (``keras/src/optimizers/base_optimizer.py``,
  ``_apply_weight_decay``: ``w - w * wd * lr`` before ``update_step``) is the spec's ``decay_times_lr`` form; the other
  form (``w -= wd * w``) is written with TF ops (:func:`decay_update`) before Keras' Adam.
* RMSprop: ``tf.keras.optimizers.RMSprop(rho, epsilon)`` (``keras/src/optimizers/rmsprop.py``: ``v = rho * v + (1 -
  rho) * g*g`` from 0, ``w -= lr * g / sqrt(v + eps)``) when the spec puts epsilon inside the square root and starts at
  0; otherwise :func:`rmsprop_update`.
* Adagrad: ``tf.keras.optimizers.Adagrad(initial_accumulator_value, epsilon)`` (``keras/src/optimizers/adagrad.py``:
  ``a += g*g``, ``w -= lr * g / sqrt(a + eps)``) when epsilon is inside the square root; otherwise
  :func:`adagrad_update`.

Native mode (``ModelBase.native(key)``, one key at a time with ``extra["native_only"]``) is what TF2 code writes:
``tf.nn`` ops and the Keras optimizers / layers with their defaults (:data:`NATIVE_DEFAULTS`, each with its source).
Each key whose default differs from the spec in this run is listed in ``info["native_settings"]`` (key -> the API and
value) and ``info["native_differences"]`` (prose).  Keys TF2 has no default of its own for are never applied:
``conv_same_padding`` / ``avgpool_count_pad`` (TF's rules are the spec's), ``class_weight_denominator`` (Keras 3's
``sum_over_batch_size``, ``keras/src/losses/loss.py`` ``reduce_values``, divides by N: the spec), ``l2_regularization``
(``keras.regularizers.L2(l2)`` is ``l2 * sum(w**2)``: the spec), ``loss_form`` (``tf.nn`` on logits is what TF2 code
writes), ``mse_broadcast`` (torch), ``clip_epsilon`` (TF adds none).  ``matmul_precision``: aligned CUDA runs switch
TF32 off (``tf.config.experimental.enable_tensor_float_32_execution(False)``, process-wide), native leaves TF's default
(on); not measured here (tensorflow-cpu).

Quirks: a ``tf.function`` called with NumPy arrays of a new shape retraces (~55 ms a call); an ``input_signature``
with a free batch dimension avoids that.  Threads can only be set before TensorFlow's runtime starts.  Inside a
``tf.function`` Keras' ``sparse_categorical_crossentropy(from_logits=False)`` does not clip a softmax output: it finds
the ``Softmax`` op and takes its input as logits (``keras/src/backend/tensorflow/nn.py``, ``_get_logits``); eagerly it
clips to ``[1e-7, 1 - 1e-7]`` (measured: logits [30, 0], label 1: 30.0 under ``tf.function``, 16.118 eagerly).
``math_ops.cast`` / Keras' ``ops.cast`` of a Python float makes a float32 tensor first, so some defaults reach a
float64 run rounded to float32 (measured): ``tf.nn.gelu``'s ``1/sqrt(2)`` and 0.044715 (hence :func:`gelu`), Keras'
Adagrad start ``Constant(0.1)`` (f32(0.1)), AdamW's ``weight_decay`` (f32(0.004)), Adam's ``beta ** t``; the ones
Keras adds or multiplies as Python floats (epsilon, ``1 - beta``, ``rho``, LayerNorm / BatchNorm epsilon) stay doubles.

Layers and optimizers come from the tables :data:`LAYER_BUILDERS` and :data:`OPTIMIZER_BUILDERS`, looked up with
``backends.base.lookup`` when the model is built (an unknown type is ``Unsupported("tf2 has no <Type>")``).  A layer's
arrays reach its builder by their ParamSpec role (``kernel``, ``bias``, ``gamma``...), never by shape.

The op builders here (:func:`forward`, :func:`loss_fn`, :func:`predict_fn`, :func:`clip_grads`, :func:`schedule_lr`
and the hand-written updates) work both eagerly and in a TF1 graph; ``backends.tf1_graph`` reuses them.
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

from .base import (  # noqa: E402
    BuildOptions,
    Capabilities,
    ModelBase,
    Unsupported,
    fmt,
    lookup,
    one_minus_beta_diffs,
    to_mib,
    value_diff,
)

CAPABILITIES = Capabilities(
    devices=("cpu", "cuda"),
    notes=("tf.keras.optimizers SGD / Adam / AdamW / RMSprop / Adagrad applied under tf.function where they compute the "
           "spec; the other forms written with TF ops",),
)
BACKEND = "tf2"



def f32(x: float) -> float:
    return float(np.float32(x))


# The defaults native mode applies (Keras 3.15 / TF 2.21 sources), by backends.base.NATIVE_KEYS key.
KERAS_BN_MOMENTUM = 0.99  # keras/src/layers/normalization/batch_normalization.py BatchNormalization(momentum=0.99,
KERAS_BN_EPSILON = 1e-3  # epsilon=1e-3), Python floats; moving * momentum + stat * (1.0 - momentum), biased variance
KERAS_LN_EPSILON = 1e-3  # keras/src/layers/normalization/layer_normalization.py LayerNormalization(epsilon=1e-3)
TF_LEAKY_RELU_ALPHA = 0.2  # tensorflow/python/ops/nn_ops.py leaky_relu(features, alpha=0.2): a float32 op attribute
TF_GELU_APPROXIMATE = False  # tensorflow/python/ops/nn_ops.py gelu(features, approximate=False)
KERAS_ADAM_EPSILON = 1e-7  # keras/src/optimizers/adam.py Adam(beta_1=0.9, beta_2=0.999, epsilon=1e-7); AdamW the same
KERAS_ADAM_BETAS = (0.9, 0.999)
# keras/src/optimizers/adamw.py AdamW(weight_decay=0.004), applied by base_optimizer._apply_weight_decay as
# ops.cast(weight_decay, dtype): float32 first, f32(0.004) in a float64 run too (measured)
KERAS_ADAMW_WEIGHT_DECAY = f32(0.004)
KERAS_RMSPROP_RHO = 0.9  # keras/src/optimizers/rmsprop.py RMSprop(rho=0.9, epsilon=1e-7): velocity from zeros,
KERAS_RMSPROP_EPSILON = 1e-7  # w -= lr * g / sqrt(velocity + epsilon)
# keras/src/optimizers/adagrad.py Adagrad(initial_accumulator_value=0.1, epsilon=1e-7): w -= lr * g / sqrt(a + eps);
# the accumulator is filled by initializers.Constant(0.1), whose __call__ is ops.cast(0.1, dtype): the Python float
# becomes a float32 tensor first, so a float64 run starts at f32(0.1) = 0.10000000149 (measured)
KERAS_ADAGRAD_INITIAL = f32(0.1)
KERAS_ADAGRAD_EPSILON = 1e-7

# key -> what TF2 code gets by default (the keys this backend applies; the others never change anything here)
NATIVE_DEFAULTS = {
    "adam_epsilon": "tf.keras.optimizers.Adam(epsilon=1e-07)",
    "adam_convention": "tf.keras.optimizers.Adam: eps added to sqrt(v) (eps_hat)",
    "adam_one_minus_beta": "tf.keras.optimizers.Adam(beta_1=0.9, beta_2=0.999): Python doubles, 1 - beta in double",
    "lr_precision": "tf.keras.optimizers.*(learning_rate=<Python float>): a float32 (floatx) variable",
    "matmul_precision": "tf.config.experimental.enable_tensor_float_32_execution(True) (TF's default)",
    "sparse_cce_probabilities": "keras.losses.sparse_categorical_crossentropy(y, p) (from_logits=False)",
    "batchnorm_momentum": "tf.keras.layers.BatchNormalization(momentum=0.99)",
    "batchnorm_epsilon": "tf.keras.layers.BatchNormalization(epsilon=1e-3)",
    "batchnorm_variance": "tf.keras.layers.BatchNormalization(): biased moving variance",
    "dropout_rng": "tf.nn.dropout(x, rate, seed): TensorFlow's RNG",
    "layernorm_epsilon": "tf.keras.layers.LayerNormalization(epsilon=1e-3)",
    "leaky_relu_slope": "tf.nn.leaky_relu(x) (alpha=0.2)",
    "gelu_approximation": "tf.nn.gelu(x) (approximate=False)",
    "momentum_form": "tf.keras.optimizers.SGD(momentum=mu): v = mu * v - lr * g; w += v (velocity)",
    "rmsprop_rho": "tf.keras.optimizers.RMSprop(rho=0.9)",
    "rmsprop_epsilon": "tf.keras.optimizers.RMSprop(epsilon=1e-07): sqrt(v + eps)",
    "rmsprop_accumulator": "tf.keras.optimizers.RMSprop(): velocity starts at 0",
    "adagrad_accumulator": "tf.keras.optimizers.Adagrad(initial_accumulator_value=0.1)",
    "adagrad_epsilon": "tf.keras.optimizers.Adagrad(epsilon=1e-07): sqrt(a + eps)",
    "adamw_weight_decay": "tf.keras.optimizers.AdamW(weight_decay=0.004)",
    "adamw_decay_form": "tf.keras.optimizers.AdamW: w -= w * wd * lr (times the learning rate)",
    "clip_scope": "tf.clip_by_global_norm(grads, max_norm)",
    "lr_schedule": "keras.optimizers.schedules.ExponentialDecay(lr, every, factor, staircase=True)",
}
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


def gpu_peak_mb(device: str) -> float | None:
    """Peak MiB TensorFlow had in use on GPU:0 (the device every CUDA model of this module and of tf1_graph runs on) in
    this process: ``tf.config.experimental.get_memory_info("GPU:0")["peak"]``, the allocator's peak bytes in use, not
    the memory it reserved (by default nearly all of the GPU).  The allocator is per process and device, so it counts
    TF1 sessions and eager work alike.  None on the CPU (where the call raises)."""
    if device != "cuda":
        return None
    return to_mib(tf.config.experimental.get_memory_info("GPU:0")["peak"])


def set_tf32(device: str, native: bool) -> dict:
    """CUDA only: TF32 off for float32 matmuls / convolutions in aligned mode, TF's default (on) in native mode.  A
    process-wide switch (``tf.config.experimental.enable_tensor_float_32_execution``), set at every model build."""
    if device != "cuda":
        return {}
    tf.config.experimental.enable_tensor_float_32_execution(bool(native))
    return {"tf32": tf.config.experimental.tensor_float_32_execution_enabled()}


def no_native(key: str) -> bool:
    return False


# ------------------------------------------------------------------------------------------ op builders (TF1 + TF2)
class Ctx:
    """What a layer builder sees: the run's dtype, training or inference mode, ``native(key)`` (whether this run applies
    the framework's default ``key``), this step's aligned dropout masks (layer index -> tensor), and, after a training
    pass, the moved state (layer index -> {role: value})."""

    def __init__(self, dtype, training: bool, native=None, masks: dict | None = None, seed: int = 0):
        self.dtype, self.training, self.masks, self.seed = dtype, training, masks or {}, seed
        self.native = native or no_native
        self.new_state: dict[int, dict] = {}


def _softmax(x):
    return tf.nn.softmax(x, axis=-1)


ACTIVATIONS = {  # the spec's plain activations -> TF's op
    "linear": lambda x: x,
    "relu": tf.nn.relu,
    "sigmoid": tf.math.sigmoid,
    "tanh": tf.math.tanh,
    "softmax": _softmax,
}


def _act(x, kind):
    return ACTIVATIONS[kind](x)


# Each builder: (ctx, layer index, layer, trainable arrays by role, state arrays by role, x) -> output; a layer that
# moves its state in training mode leaves the new values in ctx.new_state[i].
def _dense(ctx, i, layer, p, s, x):
    z = tf.matmul(x, p["kernel"])  # (N, in) @ (in, out)
    if layer.use_bias:
        z = z + p["bias"]
    return _act(z, layer.activation)


def _conv(ctx, i, layer, p, s, x):
    # NHWC * HWIO -> NHWC; TF's "SAME" is the spec's same_padding at any stride
    z = tf.nn.conv2d(x, p["kernel"], strides=list(layer.strides), padding=layer.padding.upper())
    if layer.use_bias:
        z = z + p["bias"]
    return _act(z, layer.activation)


def _pool(ctx, i, layer, p, s, x):
    return tf.nn.max_pool2d(x, ksize=layer.pool_size, strides=layer.stride, padding="VALID")


def _avgpool(ctx, i, layer, p, s, x):
    # "SAME": TF pads as the spec and divides by the in-image count of each window
    return tf.nn.avg_pool2d(x, ksize=layer.pool_size, strides=layer.stride, padding=layer.padding.upper())


def _flatten(ctx, i, layer, p, s, x):
    return tf.reshape(x, [-1, math.prod(x.shape[1:])])  # NHWC row-major: (h, w, c) order


def leaky_slope(ctx, layer):
    """The negative slope this run applies: the spec's, or tf.nn.leaky_relu's default (alpha=0.2)."""
    return TF_LEAKY_RELU_ALPHA if ctx.native("leaky_relu_slope") else layer.negative_slope


GELU_C = math.sqrt(2.0 / math.pi)


def gelu(x, tanh: bool):
    """The spec's gelu with TF ops, every constant a tensor of the input's dtype: ``0.5 * x * (1 + erf(x / sqrt 2))``
    or ``0.5 * x * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 * x**3)))``.  Not ``tf.nn.gelu``: it casts its constants from
    Python floats with ``math_ops.cast`` (``tensorflow/python/ops/nn_ops.py``, ``gelu``), which makes them float32
    first: in a float64 run its ``1/sqrt(2)`` is 0.7071067690849304 and its 0.044715 is 0.044714998453855515
    (measured: ~5e-9 from the exact gelu)."""
    c = lambda v: tf.constant(v, x.dtype)  # noqa: E731
    if tanh:
        return c(0.5) * x * (1 + tf.math.tanh(c(GELU_C) * (x + c(0.044715) * x * x * x)))
    return c(0.5) * x * (1 + tf.math.erf(x / c(math.sqrt(2.0))))


def _activation(ctx, i, layer, p, s, x):
    if layer.activation == "leaky_relu":
        return tf.nn.leaky_relu(x, alpha=leaky_slope(ctx, layer))
    if layer.activation == "gelu":
        if ctx.native("gelu_approximation"):  # TF's own op with its default (exact, its constants as it rounds them)
            return tf.nn.gelu(x, approximate=TF_GELU_APPROXIMATE)
        return gelu(x, layer.approximate == "tanh")
    return _act(x, layer.activation)


def layernorm_epsilon(ctx, layer):
    """The spec's epsilon as a tensor of the run's dtype, or Keras' LayerNormalization default (the Python 1e-3)."""
    return KERAS_LN_EPSILON if ctx.native("layernorm_epsilon") else tf.constant(layer.epsilon, ctx.dtype)


def _layernorm(ctx, i, layer, p, s, x):
    """The spec's LayerNorm with TF's own ops: each sample's mean and biased variance over the last axis
    (``tf.nn.moments``), ``tf.nn.batch_normalization`` with gamma / beta; the same in training and inference."""
    mean, var = tf.nn.moments(x, [len(x.shape) - 1], keepdims=True)
    return tf.nn.batch_normalization(x, mean, var, p["beta"], p["gamma"], layernorm_epsilon(ctx, layer))


def bessel_factor(x, dtype):
    """``n / (n - 1)`` for n values per feature of ``x`` (1 when n == 1), in float64 then cast, as the oracle has it."""
    n = tf.cast(tf.size(x) // x.shape[-1], tf.float64)
    return tf.cast(tf.where(n > 1, n / tf.maximum(n - 1, 1), tf.ones_like(n)), dtype)


def bn_apply(ctx, i, layer, p, s, x, epsilon, momentum, decay, unbiased: bool, subtract: bool = False):
    """BatchNorm with ``tf.nn.moments`` (mean, biased variance) and ``tf.nn.batch_normalization``; in training the
    state moves as ``moving * momentum + stat * decay`` (``subtract``: TF1's ``moving - (moving - stat) * decay``).
    ``epsilon`` / ``momentum`` / ``decay`` are tensors of the run's dtype (aligned) or the framework's Python floats
    (native), converted by TF as the framework converts them."""
    if not ctx.training:
        return tf.nn.batch_normalization(x, s["moving_mean"], s["moving_variance"], p["beta"], p["gamma"], epsilon)
    mean, var = tf.nn.moments(x, list(range(len(x.shape) - 1)))
    y = tf.nn.batch_normalization(x, mean, var, p["beta"], p["gamma"], epsilon)
    stored = var * bessel_factor(x, ctx.dtype) if unbiased else var
    mm, mv = s["moving_mean"], s["moving_variance"]
    if subtract:
        ctx.new_state[i] = {"moving_mean": mm - (mm - mean) * decay, "moving_variance": mv - (mv - stored) * decay}
    else:
        ctx.new_state[i] = {"moving_mean": mm * momentum + mean * decay, "moving_variance": mv * momentum + stored * decay}
    return y


def bn_aligned(ctx, i, layer, p, s, x):
    """The spec's BatchNorm, every constant a tensor of the run's dtype."""
    mom = tf.constant(layer.momentum, ctx.dtype)
    return bn_apply(ctx, i, layer, p, s, x, tf.constant(layer.epsilon, ctx.dtype), mom, 1 - mom,
                    layer.unbiased_moving_variance)


def _batchnorm(ctx, i, layer, p, s, x):
    """Aligned: :func:`bn_aligned`.  Native, per key: tf.keras.layers.BatchNormalization()'s defaults as Keras 3 applies
    them (momentum 0.99 and ``1.0 - 0.99`` as Python doubles, epsilon the Python 1e-3, the biased variance stored);
    TF has no BatchNorm layer of its own outside Keras (``tf.nn.batch_normalization`` has no defaults)."""
    if ctx.native("batchnorm_momentum"):
        mom, decay = KERAS_BN_MOMENTUM, 1.0 - KERAS_BN_MOMENTUM
    else:
        mom = tf.constant(layer.momentum, ctx.dtype)
        decay = 1 - mom
    eps = KERAS_BN_EPSILON if ctx.native("batchnorm_epsilon") else tf.constant(layer.epsilon, ctx.dtype)
    unbiased = False if ctx.native("batchnorm_variance") else layer.unbiased_moving_variance
    return bn_apply(ctx, i, layer, p, s, x, eps, mom, decay, unbiased)


def _dropout(ctx, i, layer, p, s, x):
    if not ctx.training or layer.rate == 0:
        return x
    if ctx.native("dropout_rng"):  # TensorFlow's own dropout and RNG (op seed from the run's seed and the layer)
        return tf.nn.dropout(x, rate=layer.rate, seed=ctx.seed * 1000 + i)
    return x * ctx.masks[i]  # the harness's mask: 0 or 1 / (1 - rate)


LAYER_BUILDERS = {
    Dense: _dense,
    Conv2D: _conv,
    MaxPool2D: _pool,
    AveragePooling2D: _avgpool,
    Flatten: _flatten,
    Activation: _activation,
    BatchNorm: _batchnorm,
    LayerNorm: _layernorm,
    Dropout: _dropout,
}


def forward(spec: ModelSpec, params, x, ctx: Ctx, state=(), table=None, backend: str = BACKEND):
    """Network output (logits for the cross-entropies from logits); ``params`` / ``state`` in canonical order and
    layout.  In training mode the moved state is left in ``ctx.new_state``; :func:`new_state` lists it in canonical
    order."""
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


# ---------------------------------------------------------------------------------------------------------- losses
def per_sample_loss(spec: ModelSpec, out, y, native=no_native):
    """The spec's per-sample loss from the last layer's output (logits for the cross-entropies from logits,
    probabilities for ``sparse_categorical_crossentropy``)."""
    kind = spec.loss.kind
    if kind == "sse":
        return tf.reduce_sum(tf.square(out - y), axis=-1)
    if kind == "mse":
        return tf.reduce_mean(tf.square(out - y), axis=-1)
    if kind == "binary_crossentropy":  # max(z,0) - z*y + log1p(exp(-|z|)), mean over the output units
        return tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(labels=y, logits=out), axis=-1)
    if kind == "softmax_crossentropy":
        return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=out)
    return -tf.math.log(tf.gather(out, y, batch_dims=1))  # -log p[y], on the probabilities, unclipped


def _tf2_per_sample(spec: ModelSpec, out, y, native=no_native):
    """Native ``sparse_cce_probabilities``: what TF2 code calls on a softmax output, Keras'
    ``sparse_categorical_crossentropy`` (from_logits=False), which under ``tf.function`` takes the Softmax op's input
    as logits and otherwise clips to [1e-7, 1 - 1e-7] (``keras/src/backend/tensorflow/nn.py``)."""
    if spec.loss.kind == "sparse_categorical_crossentropy" and native("sparse_cce_probabilities"):
        return tf.keras.losses.sparse_categorical_crossentropy(y, out)
    return per_sample_loss(spec, out, y, native)


def sample_weights(spec: ModelSpec, y, dtype):
    """Each sample's class weight (integer labels), or None without class weights."""
    if not spec.loss.class_weights:
        return None
    return tf.gather(tf.constant(spec.loss.class_weights, dtype), y)


def reduce_loss(spec: ModelSpec, per_sample, y, native=no_native):
    """The spec's reduction: class weights times the per-sample losses, then the sum or the sum / N."""
    w = sample_weights(spec, y, per_sample.dtype)
    if w is not None:
        per_sample = per_sample * w
    return tf.reduce_mean(per_sample) if spec.loss.reduction == "mean" else tf.reduce_sum(per_sample)


def kernels(spec: ModelSpec, params) -> list:
    """The parameters whose role is "kernel" (what L2 penalises)."""
    return [p for p, (_, _, e) in zip(params, spec.param_entries()) if e.role == "kernel"]


def l2_penalty(spec: ModelSpec, params, native=no_native):
    """``l2 * sum(kernel**2)`` over every kernel (Keras' ``regularizers.L2(l2)``), or None without L2."""
    if not spec.loss.l2:
        return None
    ks = kernels(spec, params)
    return tf.constant(spec.loss.l2, ks[0].dtype) * tf.add_n([tf.reduce_sum(tf.square(k)) for k in ks])


# how a backend computes the loss: per sample, reduced over the batch, plus the penalty (tf1_graph swaps in TF1's)
LOSS_RULES = {"per_sample": _tf2_per_sample, "reduce": reduce_loss, "penalty": l2_penalty}


def loss_fn(spec: ModelSpec, out, y, params=(), native=no_native, rules=None):
    """The spec's loss from the last layer's output, reduced over the batch, plus the L2 penalty on ``params``."""
    rules = LOSS_RULES if rules is None else rules
    loss = rules["reduce"](spec, rules["per_sample"](spec, out, y, native), y, native)
    penalty = rules["penalty"](spec, params, native)
    return loss if penalty is None else loss + penalty


def predict_fn(spec: ModelSpec, out):
    pred = spec.loss.prediction
    if pred == "sigmoid":
        return tf.math.sigmoid(out)
    if pred == "softmax":
        return tf.nn.softmax(out)
    return out


def label_spec(spec: ModelSpec, dtype):
    if spec.loss.integer_labels:
        return tf.TensorSpec([None], tf.int64, name="y")
    return tf.TensorSpec([None, *spec.output_shape], dtype, name="y")


# --------------------------------------------------------------------------- clipping, schedule, hand-written updates
def clip_grads(grads, clip, native=no_native):
    """The spec's clipping before the update: ``tf.clip_by_global_norm`` ("global") or ``tf.clip_by_norm`` per tensor
    (both ``g * max_norm / max(norm, max_norm)``, ``tensorflow/python/ops/clip_ops.py``); native ``clip_scope``: what
    TF code writes, ``tf.clip_by_global_norm``, whatever the spec's scope."""
    if clip is None:
        return list(grads)
    if clip.scope == "global" or native("clip_scope"):
        return tf.clip_by_global_norm(list(grads), clip.max_norm)[0]
    return [tf.clip_by_norm(g, clip.max_norm) for g in grads]


def keras_schedule(lr: float, t, schedule):
    """keras.optimizers.schedules.ExponentialDecay(lr, every, factor, staircase=True)(t): computed in the dtype of
    ``convert_to_tensor(lr)`` (floatx, float32) (``keras/src/optimizers/schedules/learning_rate_schedule.py``)."""
    return tf.keras.optimizers.schedules.ExponentialDecay(lr, schedule.every, schedule.factor, staircase=True)(t)


def schedule_lr(spec: ModelSpec, t, dtype, native=no_native, framework_schedule=keras_schedule,
                precision_dtype=tf.float32):
    """The learning rate of update ``t`` (an integer tensor: updates applied before it), a tensor of ``dtype``.

    Aligned: ``lr * factor ** (t // every)`` in float64 (the spec's ``lr_at``), cast.  Native ``lr_schedule``: the
    framework's scheduler with the Python floats; native ``lr_precision``: the rate passes through ``precision_dtype``
    (where the framework keeps it: Keras' floatx variable, TF1's float32 tensor)."""
    opt, sch = spec.optimizer, spec.schedule
    if sch is not None and native("lr_schedule"):
        lr = framework_schedule(float(opt.lr), t, sch)
    else:
        lr = tf.constant(float(opt.lr), tf.float64)
        if sch is not None:
            k = tf.cast(t // sch.every, tf.float64)
            lr = lr * tf.pow(tf.constant(float(sch.factor), tf.float64), k)
    if native("lr_precision"):
        lr = tf.cast(lr, precision_dtype)
    return tf.cast(lr, dtype)


def sgd_update(params, grads, bufs, lr, mu, nesterov: bool, form: str):
    """SGD written with TF ops (the spec's forms); ``bufs`` None for plain SGD.  Returns the update ops / values.

    accumulator: ``b = mu * b + g``; ``w -= lr * b`` (Nesterov ``w -= lr * (g + mu * b)``); velocity: ``v = mu * v -
    lr * g``; ``w += v`` (Nesterov ``w += mu * v - lr * g``)."""
    out = []
    for p, g, b in zip(params, grads, bufs or [None] * len(params)):
        if b is None:
            out.append(p.assign_sub(lr * g))
        elif form == "accumulator":
            b_new = b.assign(mu * b + g)
            out.append(p.assign_sub(lr * (g + mu * b_new) if nesterov else lr * b_new))
        else:
            v_new = b.assign(mu * b - lr * g)
            out.append(p.assign_add(mu * v_new - lr * g if nesterov else v_new))
    return out


def rmsprop_update(params, grads, vs, lr, rho, eps, inside: bool):
    """``v = rho * v + (1 - rho) * g*g``; ``w -= lr * g / sqrt(v + eps)`` (inside) or ``/ (sqrt(v) + eps)``."""
    out = []
    for p, g, v in zip(params, grads, vs):
        v_new = v.assign(rho * v + (1 - rho) * (g * g))
        den = tf.sqrt(v_new + eps) if inside else tf.sqrt(v_new) + eps
        out.append(p.assign_sub(lr * g / den))
    return out


def adagrad_update(params, grads, accs, lr, eps, inside: bool):
    """``a += g*g``; ``w -= lr * g / sqrt(a + eps)`` (inside) or ``/ (sqrt(a) + eps)``."""
    out = []
    for p, g, a in zip(params, grads, accs):
        a_new = a.assign_add(g * g)
        den = tf.sqrt(a_new + eps) if inside else tf.sqrt(a_new) + eps
        out.append(p.assign_sub(lr * g / den))
    return out


def decay_update(params, lr, wd, times_lr: bool):
    """AdamW's decoupled decay before the Adam update: ``w -= lr * wd * w`` (or ``w -= wd * w``)."""
    return [p.assign_sub((lr * wd if times_lr else wd) * p) for p in params]


def adam_update(params, grads, m, v, step, lr, hp, convention):
    """One Adam step written with TF ops; returns the update ops (graph mode) / tensors.

    Uses the values returned by ``assign_add`` so that it is ordered correctly in a TF1 graph as well as under
    ``tf.function``.  ``step`` is the 1-based update number (a float tensor of the run's dtype), ``lr`` this update's
    learning rate, ``hp`` beta1 / beta2 / epsilon tensors.
    """
    b1, b2, eps = hp["beta1"], hp["beta2"], hp["epsilon"]
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


def hyper(values: dict, dtype) -> dict:
    """Hyperparameters as tensors of the run's dtype (a Python float would become float32)."""
    return {n: tf.constant(v, dtype=dtype, name=n) for n, v in values.items()}


# ----------------------------------------------------------------------------------------------- native settings
class NativeNotes:
    """What native mode changed in this run: ``native_settings`` (key -> the framework's API and value) and
    ``native_diffs`` (prose), recorded by :meth:`note` only where a default differs from the spec."""

    NATIVE_DEFAULTS: dict = {}

    def native(self, key: str) -> bool:
        """ModelBase.native, for the keys this framework has a default of its own for."""
        return ModelBase.native(self, key) and key in self.NATIVE_DEFAULTS

    def note(self, key: str, api: str, *diffs) -> None:
        found = [d for d in diffs if d]
        if not found:
            return
        prev = self.native_settings.get(key)
        self.native_settings[key] = api if prev is None or api in prev.split("; ") else f"{prev}; {api}"
        self.native_diffs += [d for d in found if d not in self.native_diffs]


def one_minus_diff(what: str, used: float, spec_value: float, dtype: str) -> str | None:
    """Keras computes ``1 - x`` from its Python double, then casts: in a float32 run that can differ from the spec's
    ``1 - f32(x)``."""
    if dtype != "float32":
        return None
    a, b = np.float32(1.0 - float(used)), np.float32(1.0) - np.float32(spec_value)
    return None if a == b else f"1 - {what} from the Python double {float(used)!r}: {a:.9g} (spec, in float32: {b:.9g})"


def _activation_notes(model, i, layer, shape):
    dt = model.options.dtype
    if layer.activation == "leaky_relu" and model.native("leaky_relu_slope"):
        used = f32(TF_LEAKY_RELU_ALPHA)  # LeakyRelu's alpha is a float attribute: float32 on every dtype
        model.note("leaky_relu_slope", model.NATIVE_DEFAULTS["leaky_relu_slope"],
                   value_diff(f"leaky_relu (layer {i}) negative slope", used, layer.negative_slope, dt,
                              " (tf.nn.leaky_relu's default alpha, a float32 op attribute)", nominal=0.2))
    if layer.activation == "gelu" and model.native("gelu_approximation"):
        model.note("gelu_approximation", model.NATIVE_DEFAULTS["gelu_approximation"],
                   f"gelu (layer {i}) exact, erf (spec tanh approximation)" if layer.approximate == "tanh" else None,
                   f"gelu (layer {i}): tf.nn.gelu's 1/sqrt(2) rounded to float32 (0.7071067690849304) in a float64 run"
                   if dt == "float64" else None)


def _layernorm_notes(model, i, layer, shape):
    if model.native("layernorm_epsilon"):
        model.note("layernorm_epsilon", model.NATIVE_DEFAULTS["layernorm_epsilon"],
                   value_diff(f"LayerNorm (layer {i}) epsilon", KERAS_LN_EPSILON, layer.epsilon, model.options.dtype,
                              " (tf.keras.layers.LayerNormalization default, a Python float)"))


def _batchnorm_notes(model, i, layer, shape):
    """``model.bn_used(layer, in_shape)``: (momentum, 1 - momentum, epsilon, unbiased, note) as the framework's
    BatchNorm applies them."""
    dt = model.options.dtype
    mom, decay, eps, unbiased, note = model.bn_used(layer, shape)
    what = f"BatchNorm (layer {i})"
    api = model.NATIVE_DEFAULTS
    if model.native("batchnorm_momentum"):
        model.note("batchnorm_momentum", api["batchnorm_momentum"],
                   value_diff(f"{what} momentum", mom, layer.momentum, dt, note),
                   value_diff(f"{what} 1 - momentum", decay, 1.0 - layer.momentum, dt, note))
    if model.native("batchnorm_epsilon"):
        model.note("batchnorm_epsilon", api["batchnorm_epsilon"], value_diff(f"{what} epsilon", eps, layer.epsilon,
                                                                             dt, note))
    if model.native("batchnorm_variance") and unbiased != layer.unbiased_moving_variance:
        kind = {True: "unbiased (n/(n-1))", False: "biased"}
        model.note("batchnorm_variance", api["batchnorm_variance"],
                   f"{what} moving variance {kind[unbiased]} (spec {kind[layer.unbiased_moving_variance]}){note}")


def _dropout_notes(model, i, layer, shape):
    if layer.rate > 0 and model.native("dropout_rng"):
        model.note("dropout_rng", model.NATIVE_DEFAULTS["dropout_rng"], NATIVE_DROPOUT_DIFF)


# layer type -> what native mode records for it (layers without defaults of their own record nothing)
LAYER_NOTES = {Activation: _activation_notes, LayerNorm: _layernorm_notes, BatchNorm: _batchnorm_notes,
               Dropout: _dropout_notes}


def layer_notes(model) -> None:
    for i, (layer, shape) in enumerate(zip(model.spec.layers, model.spec.input_shapes())):
        notes = LAYER_NOTES.get(type(layer))
        if notes is not None:
            notes(model, i, layer, shape)


def clip_notes(model) -> None:
    clip = model.spec.clip
    if clip is not None and clip.scope != "global" and model.native("clip_scope"):
        model.note("clip_scope", f"tf.clip_by_global_norm(grads, {fmt(clip.max_norm)})",
                   f"gradient clipping by the global norm, tf.clip_by_global_norm (spec {clip.scope})")


def lr_notes(model, precision_note: str, framework_schedule, schedule_api: str, precision_dtype) -> None:
    """``lr_precision``: the rate as the framework keeps it; ``lr_schedule``: the framework's scheduler evaluated
    (eagerly) at the first 64 boundaries and compared with the spec's ``lr_at`` in the run's dtype."""
    spec, dt = model.spec, model.options.dtype
    lr = float(spec.optimizer.lr)
    if model.native("lr_precision"):
        used = float(np.asarray(lr, np.dtype(precision_dtype.as_numpy_dtype)))
        model.note("lr_precision", model.lr_api(), value_diff("learning rate", used, lr, dt, precision_note))
    sch = spec.schedule
    if sch is not None and model.native("lr_schedule"):
        steps = np.arange(64, dtype=np.int64) * sch.every
        out = framework_schedule(lr, tf.constant(steps), sch)
        used = np.asarray(out() if callable(out) else out).astype(dt)
        want = np.array([spec.lr_at(int(t)) for t in steps]).astype(dt)
        bad = np.flatnonzero(used != want)
        if bad.size:
            k = int(bad[0])
            model.note("lr_schedule", schedule_api.format(lr=fmt(lr), every=sch.every, factor=fmt(sch.factor)),
                       f"learning rate schedule: {schedule_api.split('(')[0]} computes in {out_dtype(out)}: update "
                       f"{int(steps[k])} gets {float(used[k])!r} (spec {float(want[k])!r})")


def out_dtype(out) -> str:
    return str((out() if callable(out) else out).dtype.name)


# --------------------------------------------------------------------------------------------------- optimizers
# optimizer type -> builder(model, opt): sets model.update (grads -> the update, after clipping) and info["optimizer"],
# and notes what native mode changed.  Each builds the "effective" hyperparameters (the spec's, with Keras' default
# substituted for every active native key) and runs the built-in Keras optimizer where it computes exactly those.
def _keras(model, cls, **kwargs):
    """The built-in Keras optimizer, its learning rate the callable :meth:`Model.lr` (a tensor of the run's dtype)."""
    k = cls(learning_rate=model.lr, **kwargs)
    k.build(model.params)  # its slots exist before tracing
    model.keras_opt = k
    return lambda grads: k.apply_gradients(zip(grads, model.params))


def _lr_words(model) -> str:
    return (f"learning rate a {model.options.dtype} tensor per update" +
            (" (Keras' float32 variable in native mode)" if model.native("lr_precision") else ""))


def _sgd(model, opt):
    mu, form = opt.momentum, opt.momentum_form
    if mu > 0 and form != "velocity" and model.native("momentum_form"):
        model.note("momentum_form", f"tf.keras.optimizers.SGD(momentum={fmt(mu)}, nesterov={opt.nesterov}): v = mu * "
                   "v - lr * g; w += v", f"SGD momentum in Keras' velocity form (spec {form})")
        form = "velocity"
    if mu == 0 or form == "velocity":
        model.update = _keras(model, tf.keras.optimizers.SGD, momentum=mu, nesterov=opt.nesterov)
        model.info["optimizer"] = (f"built-in keras.optimizers.SGD; tf.keras.optimizers.SGD(momentum={fmt(mu)}, "
                                   f"nesterov={opt.nesterov}), {_lr_words(model)}")
        return
    bufs = model.slots(0.0, "momentum")
    mu_t = tf.constant(mu, model.dtype)
    model.update = lambda grads: sgd_update(model.params, grads, bufs, model.lr(), mu_t, opt.nesterov, form)
    model.info["optimizer"] = (f"hand-written SGD, momentum as an accumulator (b = mu * b + g; w -= lr * "
                               f"{'(g + mu * b)' if opt.nesterov else 'b'}); keras.optimizers.SGD has the velocity form "
                               "only")


def _adam_settings(model, opt):
    """Effective (beta1, beta2, epsilon, convention) of an Adam / AdamW and their notes."""
    dt, name = model.options.dtype, type(opt).__name__
    b1, b2, eps, conv = opt.beta1, opt.beta2, opt.epsilon, opt.convention
    if model.native("adam_epsilon"):
        eps = KERAS_ADAM_EPSILON
        model.note("adam_epsilon", f"tf.keras.optimizers.{name}(epsilon={eps!r})",
                   value_diff(f"{name} epsilon", eps, opt.epsilon, dt))
    if model.native("adam_convention") and conv != "eps_hat":
        conv = "eps_hat"
        model.note("adam_convention", model.NATIVE_DEFAULTS["adam_convention"].replace("Adam", name),
                   f"{name} epsilon convention eps_hat (spec {opt.convention})")
    if model.native("adam_one_minus_beta"):
        b1, b2 = KERAS_ADAM_BETAS
        note = " (a Python double: 1 - beta from it; beta ** t from its float32 cast)"
        diffs = [value_diff(f"{name} beta_1", b1, opt.beta1, dt, note),
                 value_diff(f"{name} beta_2", b2, opt.beta2, dt, note)]
        if conv == "eps_hat":  # the built-in computes 1 - beta from the double; the hand-written form in the dtype
            diffs += one_minus_beta_diffs({"beta_1": b1, "beta_2": b2}, opt, dt)
        model.note("adam_one_minus_beta", model.NATIVE_DEFAULTS["adam_one_minus_beta"].replace("Adam", name), *diffs)
    return b1, b2, eps, conv


def _hand_adam(model, b1, b2, eps, conv):
    m, v = model.slots(0.0, "m"), model.slots(0.0, "v")
    hp = hyper({"beta1": b1, "beta2": b2, "epsilon": eps}, model.dtype)
    return lambda grads: adam_update(model.params, grads, m, v, model.step1(), model.lr(), hp, conv)


def _adam(model, opt):
    b1, b2, eps, conv = _adam_settings(model, opt)
    if conv == "eps_hat":
        model.update = _keras(model, tf.keras.optimizers.Adam, beta_1=b1, beta_2=b2, epsilon=eps)
        model.info["optimizer"] = (f"built-in keras.optimizers.Adam; tf.keras.optimizers.Adam(beta_1={b1!r}, "
                                   f"beta_2={b2!r}, epsilon={eps!r}), {_lr_words(model)}")
        return
    model.update = _hand_adam(model, b1, b2, eps, conv)  # Keras' Adam adds a constant eps to sqrt(v) only
    model.info["optimizer"] = (f"hand-written, spec convention ({conv}); keras.optimizers.Adam adds a constant eps to "
                               "sqrt(v) (eps_hat) only")


def _adamw(model, opt):
    b1, b2, eps, conv = _adam_settings(model, opt)
    dt, wd, times_lr = model.options.dtype, opt.weight_decay, opt.decay_times_lr
    if model.native("adamw_weight_decay"):
        wd = KERAS_ADAMW_WEIGHT_DECAY
        model.note("adamw_weight_decay", model.NATIVE_DEFAULTS["adamw_weight_decay"],
                   value_diff("AdamW weight decay", wd, opt.weight_decay, dt, " (Keras' default, cast via float32)",
                              nominal=0.004))
    if model.native("adamw_decay_form") and not times_lr:
        times_lr = True
        model.note("adamw_decay_form", model.NATIVE_DEFAULTS["adamw_decay_form"],
                   "AdamW decay times the learning rate, w -= w * wd * lr (spec w -= wd * w)")
    if conv == "eps_hat" and times_lr:
        model.update = _keras(model, tf.keras.optimizers.AdamW, weight_decay=wd, beta_1=b1, beta_2=b2, epsilon=eps)
        model.info["optimizer"] = (f"built-in keras.optimizers.AdamW; tf.keras.optimizers.AdamW(weight_decay={wd!r}, "
                                   f"beta_1={b1!r}, beta_2={b2!r}, epsilon={eps!r}), {_lr_words(model)}")
        return
    wd_t = tf.constant(wd, model.dtype)
    if conv == "eps_hat":
        adam = _keras(model, tf.keras.optimizers.Adam, beta_1=b1, beta_2=b2, epsilon=eps)
        model.info["optimizer"] = ("hand-written decay w -= wd * w (keras.optimizers.AdamW multiplies it by the "
                                   "learning rate), then the built-in keras.optimizers.Adam")
    else:
        adam = _hand_adam(model, b1, b2, eps, conv)
        model.info["optimizer"] = (f"hand-written AdamW, spec convention ({conv}), decay "
                                   f"{'w -= lr * wd * w' if times_lr else 'w -= wd * w'}")

    def update(grads):
        decay_update(model.params, model.lr(), wd_t, times_lr)  # ordered before the Adam update by tf.function
        return adam(grads)

    model.update = update


def _rmsprop(model, opt):
    dt = model.options.dtype
    rho, eps, inside, v0 = opt.rho, opt.epsilon, opt.epsilon_inside_sqrt, opt.initial_accumulator
    api = model.NATIVE_DEFAULTS
    if model.native("rmsprop_rho"):
        rho = KERAS_RMSPROP_RHO
        model.note("rmsprop_rho", api["rmsprop_rho"], value_diff("RMSprop rho", rho, opt.rho, dt, " (a Python double)"),
                   one_minus_diff("RMSprop rho", rho, opt.rho, dt))
    if model.native("rmsprop_epsilon"):
        eps, inside = KERAS_RMSPROP_EPSILON, True
        model.note("rmsprop_epsilon", api["rmsprop_epsilon"], value_diff("RMSprop epsilon", eps, opt.epsilon, dt),
                   None if opt.epsilon_inside_sqrt else "RMSprop epsilon inside the square root, sqrt(v + eps) (spec "
                                                        "outside, sqrt(v) + eps)")
    if model.native("rmsprop_accumulator"):
        v0 = 0.0
        model.note("rmsprop_accumulator", api["rmsprop_accumulator"],
                   value_diff("RMSprop initial accumulator", v0, opt.initial_accumulator, dt))
    if inside and v0 == 0:
        model.update = _keras(model, tf.keras.optimizers.RMSprop, rho=rho, epsilon=eps)
        model.info["optimizer"] = (f"built-in keras.optimizers.RMSprop; tf.keras.optimizers.RMSprop(rho={rho!r}, "
                                   f"epsilon={eps!r}), {_lr_words(model)}")
        return
    vs = model.slots(v0, "rms")
    hp = hyper({"rho": rho, "epsilon": eps}, model.dtype)
    model.update = lambda grads: rmsprop_update(model.params, grads, vs, model.lr(), hp["rho"], hp["epsilon"], inside)
    model.info["optimizer"] = (f"hand-written RMSprop (eps {'inside' if inside else 'outside'} the square root, v "
                               f"from {fmt(v0)}); keras.optimizers.RMSprop has sqrt(v + eps) from 0 only")


def _adagrad(model, opt):
    dt = model.options.dtype
    a0, eps, inside = opt.initial_accumulator, opt.epsilon, opt.epsilon_inside_sqrt
    api = model.NATIVE_DEFAULTS
    if model.native("adagrad_accumulator"):
        a0 = KERAS_ADAGRAD_INITIAL
        model.note("adagrad_accumulator", api["adagrad_accumulator"],
                   value_diff("Adagrad initial accumulator", a0, opt.initial_accumulator, dt,
                              " (Keras' Constant(0.1) initializer: float32 first)", nominal=0.1))
    if model.native("adagrad_epsilon"):
        eps, inside = KERAS_ADAGRAD_EPSILON, True
        model.note("adagrad_epsilon", api["adagrad_epsilon"], value_diff("Adagrad epsilon", eps, opt.epsilon, dt),
                   None if opt.epsilon_inside_sqrt else "Adagrad epsilon inside the square root, sqrt(a + eps) (spec "
                                                        "outside, sqrt(a) + eps)")
    if inside:
        model.update = _keras(model, tf.keras.optimizers.Adagrad, initial_accumulator_value=a0, epsilon=eps)
        model.info["optimizer"] = (f"built-in keras.optimizers.Adagrad; tf.keras.optimizers.Adagrad("
                                   f"initial_accumulator_value={a0!r}, epsilon={eps!r}), {_lr_words(model)}")
        return
    accs = model.slots(a0, "accumulator")
    eps_t = tf.constant(eps, model.dtype)
    model.update = lambda grads: adagrad_update(model.params, grads, accs, model.lr(), eps_t, inside)
    model.info["optimizer"] = ("hand-written Adagrad (eps outside the square root: sqrt(a) + eps); "
                               "keras.optimizers.Adagrad has sqrt(a + eps) only")


OPTIMIZER_BUILDERS = {SGD: _sgd, Adam: _adam, AdamW: _adamw, RMSprop: _rmsprop, Adagrad: _adagrad}


def _keras_bn_used(layer, shape):
    return (KERAS_BN_MOMENTUM, 1.0 - KERAS_BN_MOMENTUM, KERAS_BN_EPSILON, False,
            " (tf.keras.layers.BatchNormalization() default, a Python float)")


def _loss_notes(model) -> None:
    spec = model.spec
    if spec.loss.kind == "sparse_categorical_crossentropy" and model.native("sparse_cce_probabilities"):
        if getattr(spec.layers[-1], "activation", None) == "softmax":
            model.note("sparse_cce_probabilities", "keras.losses.sparse_categorical_crossentropy(y, p) under "
                       "tf.function: the logits of the Softmax op (no clipping)",
                       "sparse categorical crossentropy: Keras takes the Softmax op's logits under tf.function, "
                       "log-softmax of the logits (spec -log of the probabilities)")
        else:
            model.note("sparse_cce_probabilities", "keras.losses.sparse_categorical_crossentropy(y, p): clips p to "
                       "[1e-7, 1 - 1e-7]", "sparse categorical crossentropy on probabilities clipped to [1e-7, "
                       "1 - 1e-7] (spec: unclipped)")


# ------------------------------------------------------------------------------------------------------- the model
class Model(NativeNotes, ModelBase):
    capabilities = CAPABILITIES
    NATIVE_DEFAULTS = NATIVE_DEFAULTS

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
        self.updates = 0  # updates applied so far: the step whose dropout masks the next pass uses
        self.keras_opt = None
        self.native_settings: dict[str, str] = {}
        self.native_diffs: list[str] = []
        self.info = {**environment_info(), "device": self.device, "threads": options.threads,
                     **set_tf32(options.device, self.native("matmul_precision"))}
        with tf.device(self.device):
            self.params = [tf.Variable(np.asarray(w, self.np_dtype), name=n)
                           for w, n in zip(weights, spec.param_names())]
            self.state = [tf.Variable(np.asarray(s, self.np_dtype), name=n, trainable=False)
                          for s, n in zip(init_state(spec), spec.state_names())]
            self.t = tf.Variable(0, dtype=tf.int64, trainable=False, name="updates")  # the schedule's step
            build_optimizer(self, spec.optimizer)
        self._notes()
        self.info["loss"] = {"sse": "sum of squares", "mse": "mean of squares over the last axis",
                             "sparse_categorical_crossentropy": "-log p[y] on the probabilities (tf.gather), "
                             "unclipped"}.get(spec.loss.kind, "tf.nn ops on logits (stable formula)")
        if spec.state_entries():
            self.info["batchnorm"] = (
                "tf.nn.moments + tf.nn.batch_normalization with tf.keras.layers.BatchNormalization()'s defaults for "
                "the native keys (momentum 0.99, epsilon 1e-3 as Python floats, biased moving variance; "
                "tf.nn.batch_normalization has no defaults of its own and native mode takes Keras' optimizers)"
                if any(self.native(k) for k in ("batchnorm_momentum", "batchnorm_epsilon", "batchnorm_variance")) else
                "tf.nn.moments + tf.nn.batch_normalization, spec momentum/epsilon as run-dtype tensors; state in "
                "tf.Variables assigned inside the step")
        if spec.random_layers:
            self.info["dropout"] = ("native: tf.nn.dropout, TensorFlow's RNG" if self.native("dropout_rng") else
                                    "the harness's masks, step-function arguments (free batch dimension)")
        if options.mode == "native":
            self.info["native_settings"] = dict(self.native_settings)
            self.info["native_differences"] = list(self.native_diffs)

        x_sig = tf.TensorSpec([None, *spec.input_shape], self.dtype, name="x")
        y_sig = label_spec(spec, self.dtype)
        shapes = spec.input_shapes()
        self.n_masks = 0 if self.native("dropout_rng") else len(spec.random_layers)
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

    def _notes(self) -> None:
        """What native mode changes against the spec, key by key (nothing in aligned mode)."""
        layer_notes(self)
        _loss_notes(self)
        clip_notes(self)
        floatx = tf.as_dtype(tf.keras.backend.floatx())
        lr_notes(self, f" (tf.keras keeps it in a {floatx.name} variable: floatx is {floatx.name})", keras_schedule,
                 "keras.optimizers.schedules.ExponentialDecay({lr}, {every}, {factor}, staircase=True)", floatx)
        if self.info.get("tf32") and self.options.dtype == "float32":
            self.note("matmul_precision", NATIVE_DEFAULTS["matmul_precision"],
                      "float32 matmuls / convolutions may use TF32 on the GPU (TF's default)")

    def bn_used(self, layer, shape):
        return _keras_bn_used(layer, shape)

    def lr_api(self) -> str:
        """Native ``lr_precision``: what TF2 code writes, the Keras optimizer with a Python-float learning rate."""
        floatx = tf.keras.backend.floatx()
        return (f"tf.keras.optimizers.{type(self.spec.optimizer).__name__}(learning_rate="
                f"{fmt(self.spec.optimizer.lr)}): a {floatx} variable (floatx)")

    # -- pieces the optimizer builders use -------------------------------------------------------------------------
    def lr(self):
        """This update's learning rate (read from the update counter inside the traced step)."""
        return schedule_lr(self.spec, self.t, self.dtype, self.native, keras_schedule,
                           tf.as_dtype(tf.keras.backend.floatx()))

    def step1(self):
        """The 1-based number of this update, in the run's dtype."""
        return tf.cast(self.t + 1, self.dtype)

    def slots(self, value: float, name: str):
        """One optimizer slot per parameter, filled with ``value`` (in the run's dtype)."""
        return [tf.Variable(np.full(p.shape, value, self.np_dtype), trainable=False, name=name) for p in self.params]

    # -- traced bodies ----------------------------------------------------------------------------------------------
    def _ctx(self, training, masks=()):
        return Ctx(self.dtype, training, self.native, dict(zip(self.spec.random_layers, masks)), self.options.seed)

    def _loss_and_grads(self, x, y, masks):
        ctx = self._ctx(True, masks)
        with tf.GradientTape() as tape:
            out = forward(self.spec, self.params, x, ctx, self.state)
            loss = loss_fn(self.spec, out, y, self.params, self.native)
        return loss, tape.gradient(loss, self.params), new_state(self.spec, ctx, self.state)

    def _step_py(self, x, y, *masks):
        loss, grads, state = self._loss_and_grads(x, y, masks)
        for var, value in zip(self.state, state):  # BatchNorm's moving statistics, from this step's batch
            var.assign(value)
        self.update(clip_grads(grads, self.spec.clip, self.native))  # reads self.t (the learning rate)
        self.t.assign_add(1)  # after the update: tf.function orders the ops on one variable as written
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
        """This step's aligned dropout masks (none when native dropout draws its own)."""
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

    def gpu_peak_mb(self) -> float | None:
        """See :func:`gpu_peak_mb` (module level)."""
        return gpu_peak_mb(self.options.device)
