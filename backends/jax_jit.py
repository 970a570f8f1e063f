"""Pure JAX: parameters as a list of arrays, the whole train step (loss, grad, clip, update) under ``jax.jit``.

Layouts are the canonical ones as they are: ``jnp.dot`` on ``(in, out)`` kernels, ``lax.conv_general_dilated`` with
``('NHWC', 'HWIO', 'NHWC')``, flatten of NHWC in (h, w, c) order: no conversion anywhere.

* Every layer type and the optimizer are looked up in ``LAYER_BUILDERS`` / ``OPTIMIZER_BUILDERS``
  (``backends.base.lookup``) when the model is built: a type missing from them is ``Unsupported``, never dropped.
  A layer's arrays reach its builder by ParamSpec role (``kernel``, ``bias``, ``gamma``, ...), never by shape.
* Pure JAX has no layers: every layer is the spec's formula from ``lax`` / ``jnp`` primitives.  Conv2D is
  ``lax.conv_general_dilated`` with the spec's strides and its explicit zero pads (``Conv2D.pads``: TF's 'same' rule);
  MaxPool2D ``lax.reduce_window(max)`` at the spec's stride, 'valid'; AveragePooling2D ``lax.reduce_window(add)`` over
  the zero-padded input divided by ``reduce_window(add)`` of ones (the in-image values of each window); LayerNorm the
  spec's formula in the oracle's order; BatchNorm likewise (``moving*momentum + stat*(1 - momentum)``, the stored
  variance times n/(n-1) when ``unbiased_moving_variance``); its moving statistics are the model's *state*: an
  argument of every jitted function and, from the train step, a result; ``gradients`` drops the new state.
* Activations: ``jax.nn.relu`` (gradient 0 at 0, like the oracle; ``jnp.maximum(z, 0)`` would give 0.5 there),
  ``jax.nn.sigmoid``, ``jnp.tanh``, ``jax.nn.softmax`` (last axis), ``jax.nn.gelu(approximate=...)`` (its exact form is
  ``0.5*x*erfc(-x/sqrt(2))`` = the spec's, its tanh form the spec's tanh formula: jax/_src/nn/functions.py ``gelu``);
  leaky_relu is written ``where(x > 0, x, slope*x)`` (``jax.nn.leaky_relu`` tests ``x >= 0``: gradient 1 at 0).
* Dropout, aligned: times the harness's masks (``ModelBase.dropout_masks`` of the step), passed to the jitted step as
  arguments (stacked ``(k, B, ...)`` for the scan).
* Max-pooling's gradient goes to the *first* maximum of a window on ties, like the NumPy oracle (checked by
  ``tests/test_backend_torch_jax.py`` on the device JAX runs on; ties are common on MNIST).
* Losses: the spec's formulas written out (stable from logits; ``mse`` the mean over the last axis;
  ``sparse_categorical_crossentropy`` ``-log p[y]`` on the probabilities, unclipped), times the class weights of the
  labels (``reduction="mean"`` divides the weighted sum by N), plus ``l2 * sum(kernel**2)`` over the kernels.
* Clipping (``spec.clip``) between the gradients and the update, in the jitted step: "global" is the built-in
  ``optax.clip_by_global_norm(max_norm)`` (``select(norm < max_norm, g, g / norm * max_norm)``, no epsilon: the spec),
  "per_tensor" is written by hand (optax has no per-tensor norm clip).  ``gradients()`` reports unclipped gradients.
* Learning rate: update t uses ``spec.lr_at(t)``, computed on the host in double and passed to the jitted step as a
  traced scalar (no retrace; stacked for the scan).  Each optax optimizer is built inside the step around it
  (``optax.sgd(lr_t, ...)``: ``scale_by_learning_rate`` of a scalar keeps no state, so the state built from the base lr
  is the state of every step).
* Aligned optimizers, the built-in where optax computes the spec (``info["optimizer"]`` says which ran):
  ``optax.sgd`` (plain, and momentum in the accumulator form, Nesterov as the spec's ``g + mu*b``: optax's ``trace``);
  ``optax.adam`` / ``optax.adamw`` for ``eps_v_hat`` (optax adds eps to ``sqrt(v_hat)``; adamw chains
  ``add_decayed_weights`` before ``scale_by_learning_rate``: ``w -= lr_t*(adam + wd*w)``, the spec's decay times lr);
  ``optax.rmsprop(decay=rho, eps, initial_scale, eps_in_sqrt)`` (both epsilon placements); ``optax.adagrad`` for eps
  inside the square root.  Written by hand from jnp ops: SGD's velocity form (Keras), Adam's ``eps_hat`` convention
  (``m += (g - m)*(1-b1)``, ``v += (g*g - v)*(1-b2)``, ``p -= (m*alpha)/(sqrt(v) + eps)``, ``alpha_t =
  lr_t*sqrt(1-b2^t)/(1-b1^t)`` in double on the host), AdamW's decay not times lr (``w -= wd*w``, then the Adam
  update), Adagrad with eps outside the square root.
* Aligned mode asks for ``Precision.HIGHEST`` on every dot/conv (no TF32 / bf16 passes on GPUs; no effect on CPU).
* float64 needs ``jax_enable_x64`` at start-up (the harness sets ``JAX_ENABLE_X64=1`` for float64 runs); a float64
  run without it raises ``Unsupported``.
* Intra-op threads cannot be changed after JAX has started (``XLA_FLAGS`` decides them); ``options.threads`` is
  recorded, not applied.

Every jitted function is lowered and compiled ahead of time on first use per input shape, so that
``info["trace_s"]`` (the train step's first trace + compile) is measured apart from the steps.  The jitted functions
and their executables are shared by all models of one spec, mode, set of native keys, dtype and device in a process
(a multi-seed worker traces and compiles once; ``info["compile_reused"]`` counts the reused ones, whose ``compile_s``
is the first model's).

Fast mode: ``train_steps`` runs ``lax.scan`` over the whole stack of batches in one compiled call instead of a Python
loop over the jitted step (same step function inside; see the test for the agreement).

Native mode: what a pure-JAX user writes, one ``backends.base.NATIVE_KEYS`` key at a time (``ModelBase.native``;
``extra["native_only"]`` picks keys).  Each default is read from the framework's source and measured by
tests/test_vocab_jax.py; ``info["native_settings"]`` names the API and value of each key that differs in the run:

* ``adam_epsilon`` / ``adam_convention``: ``optax.adam`` / ``optax.adamw`` eps=1e-8 added to ``sqrt(v_hat)``
  (optax/_src/alias.py ``adam``, ``adamw``; optax/_src/transform.py ``scale_by_adam``); ``adam_one_minus_beta``: their
  b1=0.9, b2=0.999 are Python doubles, and optax's moment update computes ``(1 - b) * g`` from the double
  (optax/tree_utils/_tree_math.py ``tree_update_moment``) while its bias correction ``1 - b**t`` uses the cast value:
  in a float32 run 1 - b1 is 0.1f, not 1 - 0.9f (measured: the first update is off by 6.5e-6 relative), in a float64
  run b1 is 0.9, not the spec's float32-exact 0.89999998;
* ``adamw_weight_decay`` / ``adamw_decay_form``: ``optax.adamw`` weight_decay=1e-4, times the learning rate
  (optax/_src/alias.py ``adamw``: ``add_decayed_weights`` then ``scale_by_learning_rate``);
* ``momentum_form``: ``optax.sgd(lr, momentum, nesterov)`` is the accumulator form
  (optax/transforms/_accumulation.py ``trace``: ``t = g + mu*t``);
* ``rmsprop_rho`` / ``rmsprop_epsilon`` / ``rmsprop_accumulator``: ``optax.rmsprop`` decay=0.9, eps=1e-8 inside the
  square root (``eps_in_sqrt=True``), initial_scale=0 (optax/_src/alias.py ``rmsprop``, transform.py ``scale_by_rms``);
* ``adagrad_accumulator`` / ``adagrad_epsilon``: ``optax.adagrad`` initial_accumulator_value=0.1, eps=1e-7 inside
  (optax/_src/alias.py ``adagrad``, transform.py ``scale_by_rss``: ``rsqrt(a + eps)``);
* ``clip_scope``: ``optax.clip_by_global_norm`` (optax/transforms/_clipping.py), global whatever the spec's scope;
  ``clip_epsilon``: it adds nothing to the norm, so it never differs;
* ``lr_schedule``: ``optax.exponential_decay(lr, every, factor, staircase=True)`` evaluated at the int32 update count
  as ``optax.scale_by_schedule`` does (optax/schedules/_schedule.py): it computes in float32 (the count is int32),
  also in a float64 run (measured): lr_t rounded to float32;
* ``leaky_relu_slope``: ``jax.nn.leaky_relu`` negative_slope=0.01; ``gelu_approximation``: ``jax.nn.gelu``
  approximate=True (jax/_src/nn/functions.py);
* ``layernorm_epsilon``: flax.linen.LayerNorm epsilon=1e-6 and ``avgpool_count_pad``: flax.linen.avg_pool
  count_include_pad=True (sum / window size) where a pure-JAX user reaches for flax (flax/linen/normalization.py
  ``LayerNorm``, flax/linen/pooling.py ``avg_pool``, read from flax's repository: flax is not installed here, the
  formulas are written in lax);
* ``conv_same_padding``: ``lax.conv_general_dilated(padding="SAME")`` is TF's rule, the spec's: never differs;
* ``loss_form``: ``optax.squared_error`` / ``optax.sigmoid_binary_cross_entropy`` /
  ``optax.softmax_cross_entropy_with_integer_labels``, already stable from logits: no difference (optax has no
  crossentropy on probabilities: sparse CCE is written by hand = spec);
* ``matmul_precision``: XLA's default precision (on a GPU float32 may use TF32; on the CPU it changes nothing);
* ``dropout_rng``: ``jax.random.bernoulli`` with a key made in the step from the uint32 pair (run seed, step), folded
  with the layer's index.
Class weights, the L2 penalty and BatchNorm are written by the pure-JAX user (no JAX default): native = spec.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

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

from .base import (
    NATIVE_KEYS,
    BuildOptions,
    Capabilities,
    ModelBase,
    Unsupported,
    lookup,
    one_minus_beta_diffs,
    value_diff,
    xla_peak_mb,
)

BACKEND = "jax"

CAPABILITIES = Capabilities(
    devices=("cpu", "cuda"),
    notes=("canonical layout as is (NHWC/HWIO); whole step under jax.jit; fast mode = lax.scan over the batches",
           "float64 needs JAX_ENABLE_X64=1 before jax is imported (the harness sets it)",
           "no BatchNorm in pure JAX: the spec's formula from primitive ops, in native mode too (native = spec)"),
)

# The defaults native mode substitutes, each read from the framework's source (cited) and measured by the tests.
JAX_LEAKY_RELU_SLOPE = 0.01  # jax/_src/nn/functions.py: leaky_relu(x, negative_slope=1e-2), where(x >= 0, ...)
JAX_GELU_APPROXIMATE = True  # jax/_src/nn/functions.py: gelu(x, approximate=True)
FLAX_LAYERNORM_EPSILON = 1e-6  # flax/linen/normalization.py: LayerNorm.epsilon = 1e-6 (flax's repository)
OPTAX_ADAM_EPS = 1e-8  # optax/_src/alias.py: adam / adamw(eps=1e-8), scale_by_adam: m_hat / (sqrt(v_hat) + eps)
# optax/_src/alias.py: adam / adamw(b1=0.9, b2=0.999), Python doubles: optax/tree_utils/_tree_math.py
# tree_update_moment computes (1 - decay) * g in Python double then casts (float32 runs: 1 - b1 = 0.1f, not
# 1 - 0.9f), while tree_bias_correction's 1 - decay**count uses the float32-cast decay (measured by the tests)
OPTAX_ADAM_BETAS = (0.9, 0.999)
OPTAX_ADAMW_WEIGHT_DECAY = 1e-4  # optax/_src/alias.py: adamw(weight_decay=1e-4)
OPTAX_RMSPROP = {"decay": 0.9, "eps": 1e-8, "initial_scale": 0.0, "eps_in_sqrt": True}  # optax/_src/alias.py rmsprop
OPTAX_ADAGRAD = {"initial_accumulator_value": 0.1, "eps": 1e-7}  # optax/_src/alias.py adagrad (eps inside, scale_by_rss)


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


def _optax():
    try:
        import optax
    except ImportError:
        raise Unsupported("optax is not installed (the built-in optimizers and losses): pip install '.[jax]'") from None
    return optax


def _dt(x):
    """The scalar type of ``x``'s dtype: constants are cast to it first, like the oracle's."""
    return np.dtype(x.dtype).type


# ---------------------------------------------------------------------------------------------- the layer maths
class _Pass:
    """What a layer sees of the pass it runs in: training or inference mode, the matmul/conv precision, the dropout
    noise of this step (aligned: the harness's masks by layer index; native: a jax.random key) and the native keys
    this model applies (``native(key)``; a frozenset, so that the jitted functions close over plain data)."""

    def __init__(self, training: bool, precision=None, masks=None, key=None, switches: frozenset = frozenset()):
        self.training, self.precision, self.masks, self.key = training, precision, masks or {}, key
        self.switches = switches

    def native(self, key: str) -> bool:
        return key in self.switches


def _act(ctx: _Pass, z, kind: str, layer=None):
    """The activation ``kind``; ``layer`` (an Activation) carries leaky_relu's slope and gelu's form."""
    if kind == "relu":
        return jax.nn.relu(z)
    if kind == "sigmoid":
        return jax.nn.sigmoid(z)
    if kind == "tanh":
        return jnp.tanh(z)
    if kind == "softmax":
        return jax.nn.softmax(z, axis=-1)
    if kind == "leaky_relu":
        if ctx.native("leaky_relu_slope"):  # jax.nn.leaky_relu's default slope 0.01
            return jax.nn.leaky_relu(z)
        return jnp.where(z > 0, z, z * _dt(z)(layer.negative_slope))
    if kind == "gelu":  # both of jax.nn.gelu's forms are the spec's formulas
        approximate = JAX_GELU_APPROXIMATE if ctx.native("gelu_approximation") else layer.approximate == "tanh"
        return jax.nn.gelu(z, approximate=approximate)
    return z


# Each layer type maps to ``build(ctx, layer, params, state, x, index) -> (output, new state)``, where ``params`` /
# ``state`` are the layer's trainable / state arrays by ParamSpec role (``{"kernel": ..., "bias": ...}``).
def _dense(ctx, layer, p, s, x, i):
    z = jnp.dot(x, p["kernel"], precision=ctx.precision)
    if layer.use_bias:
        z = z + p["bias"]
    return _act(ctx, z, layer.activation), s


def _conv(ctx, layer, p, s, x, i):
    """``lax.conv_general_dilated`` at the spec's strides.  Aligned: the spec's explicit zero pads (``Conv2D.pads``:
    TF's 'same', the odd pixel bottom / right); native (conv_same_padding): lax's own ``padding="SAME"``, which is
    the same rule (jax/_src/lax/lax.py ``padtype_to_pads``): it never differs."""
    if layer.padding == "same" and ctx.native("conv_same_padding"):
        padding = "SAME"
    else:
        padding = [tuple(pad) for pad in layer.pads(x.shape[1:])]
    z = lax.conv_general_dilated(x, p["kernel"], window_strides=layer.strides, padding=padding,
                                 dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=ctx.precision)
    if layer.use_bias:
        z = z + p["bias"]
    return _act(ctx, z, layer.activation), s


def _pool(ctx, layer, p, s, x, i):
    k, st = layer.pool_size, layer.stride
    return lax.reduce_window(x, -jnp.inf, lax.max, (1, k, k, 1), (1, st, st, 1), "VALID"), s


def _avg_pool(ctx, layer, p, s, x, i):
    """The window's sum over the zero-padded input (``lax.reduce_window(add)``) divided by the number of its values
    inside the image (the same reduce_window over ones: TF's 'same').  Native (avgpool_count_pad): flax's
    ``avg_pool(padding="SAME", count_include_pad=True)`` (flax/linen/pooling.py), which divides by the full window
    size, padded zeros counted."""
    k, st = layer.pool_size, layer.stride
    dims, strides = (1, k, k, 1), (1, st, st, 1)
    zero = np.zeros((), x.dtype)
    if ctx.native("avgpool_count_pad"):
        padding = layer.padding.upper()
        return lax.reduce_window(x, zero, lax.add, dims, strides, padding) / _dt(x)(k * k), s
    padding = ((0, 0), *layer.pads(x.shape[1:]), (0, 0))
    total = lax.reduce_window(x, zero, lax.add, dims, strides, padding)
    count = lax.reduce_window(np.ones((1, *x.shape[1:3], 1), x.dtype), zero, lax.add, dims, strides, padding)
    return total / count, s


def _flatten(ctx, layer, p, s, x, i):
    return x.reshape(x.shape[0], -1), s  # NHWC -> (h, w, c) order


def _activation(ctx, layer, p, s, x, i):
    return _act(ctx, x, layer.activation, layer), s


def _layer_norm(ctx, layer, p, s, x, i):
    """The spec's LayerNorm over the last axis in the oracle's order (the sample's mean and biased variance, ``(x -
    mean) * (1/sqrt(var + eps)) * gamma + beta``); native (layernorm_epsilon): flax.linen.LayerNorm's epsilon 1e-6
    (flax/linen/normalization.py; flax's ``use_fast_variance`` E[x^2] - E[x]^2 is not a key: not applied)."""
    dt = _dt(x)
    eps = dt(FLAX_LAYERNORM_EPSILON if ctx.native("layernorm_epsilon") else layer.epsilon)
    k = dt(x.shape[-1])
    mean = jnp.sum(x, axis=-1, keepdims=True) / k
    xc = x - mean
    var = jnp.sum(xc * xc, axis=-1, keepdims=True) / k
    inv = 1 / jnp.sqrt(var + eps)
    return xc * inv * p["gamma"] + p["beta"], s


def _batch_norm(ctx, layer, p, s, x, i):
    """The spec's BatchNorm from primitive ops, in the oracle's order of operations (JAX has no BatchNorm of its own:
    native mode runs this too).  Training: the batch's mean and biased variance over every axis but the last, the state
    moved as ``moving*momentum + stat*(1 - momentum)`` (the variance times n/(n-1) when unbiased_moving_variance);
    inference: the moving statistics.  Constants are cast to the run's dtype first, like the oracle's."""
    dt = _dt(x)
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
    native (dropout_rng): JAX's own RNG, ``jax.random.bernoulli`` with a key folded from the run's seed, the step and
    the layer index (as flax's Dropout draws it: ``select(keep, x / keep_prob, 0)``)."""
    if not ctx.training or layer.rate == 0:
        return x, s
    if ctx.key is None:
        return x * ctx.masks[i], s
    keep_prob = 1.0 - layer.rate
    keep = jax.random.bernoulli(jax.random.fold_in(ctx.key, i), keep_prob, x.shape)
    return lax.select(keep, x / _dt(x)(keep_prob), jnp.zeros_like(x)), s


LAYER_BUILDERS = {
    Dense: _dense,
    Conv2D: _conv,
    MaxPool2D: _pool,
    AveragePooling2D: _avg_pool,
    Flatten: _flatten,
    Activation: _activation,
    BatchNorm: _batch_norm,
    LayerNorm: _layer_norm,
    Dropout: _dropout,
}


def run(spec: ModelSpec, params, state, x, ctx: _Pass):
    """Network output (logits for the cross-entropies from logits) and the state after the pass (moved in training
    mode), as a flat list in ``spec.state_names()`` order; canonical layout throughout."""
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


# ------------------------------------------------------------------------------------------------------ the losses
def _picked(a, y):
    return jnp.take_along_axis(a, y[:, None], axis=-1)[:, 0]


def _sse(out, y):
    d = out - y
    return jnp.sum(d * d, axis=-1)


def _mse(out, y):
    d = out - y
    return jnp.mean(d * d, axis=-1)


def _bce(out, y):  # max(z,0) - z*y + log(1 + exp(-|z|)), mean over the output units
    return jnp.mean(jnp.maximum(out, 0) - out * y + jnp.log1p(jnp.exp(-jnp.abs(out))), axis=-1)


def _softmax_ce(out, y):
    return -_picked(jax.nn.log_softmax(out, axis=-1), y)


def _sparse_cce(out, y):  # -log p[y] on the probabilities, unclipped
    return -jnp.log(_picked(out, y))


# loss kind -> (the spec's per-sample formula, what a JAX user writes (native loss_form) and its name); the user's
# losses are optax's, already stable from logits (optax/losses/_regression.py squared_error,
# optax/losses/_classification.py sigmoid_binary_cross_entropy, softmax_cross_entropy_with_integer_labels); optax has
# no crossentropy on probabilities, so sparse CCE is the hand-written spec in both modes.
LOSS_FORMS: dict[str, tuple[Callable, Callable | None, str]] = {
    "sse": (_sse, lambda o, y: jnp.sum(_optax().squared_error(o, y), axis=-1), "jnp.sum(optax.squared_error, -1)"),
    "mse": (_mse, lambda o, y: jnp.mean(_optax().squared_error(o, y), axis=-1), "jnp.mean(optax.squared_error, -1)"),
    "binary_crossentropy": (_bce, lambda o, y: jnp.mean(_optax().sigmoid_binary_cross_entropy(o, y), axis=-1),
                            "optax.sigmoid_binary_cross_entropy"),
    "softmax_crossentropy": (_softmax_ce, lambda o, y: _optax().softmax_cross_entropy_with_integer_labels(o, y),
                             "optax.softmax_cross_entropy_with_integer_labels"),
    "sparse_categorical_crossentropy": (_sparse_cce, None, "-jnp.log(p[y]) by hand (no optax loss on probabilities)"),
}


def loss_of(spec: ModelSpec, native_form: bool):
    """``loss(out, y)``: per sample (the spec's formula, or with ``native_form`` optax's), times the class weight of
    each sample's label, reduced over the batch (mean: the weighted sum / N).  The L2 penalty is added by the step."""
    aligned, native, _ = LOSS_FORMS[spec.loss.kind]
    per_sample = native if native_form and native is not None else aligned
    weights = np.asarray(spec.loss.class_weights, np.float64) if spec.loss.class_weights else None
    mean = spec.loss.reduction == "mean"

    def loss(out, y):
        values = per_sample(out, y)
        if weights is not None:
            values = values * jnp.asarray(weights.astype(out.dtype))[y]
        return jnp.mean(values) if mean else jnp.sum(values)

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
    spec, mode, native keys, dtype and device in this process (``_SHARED``): a worker that runs many seeds traces and
    compiles each function once.  The functions close over nothing but what that key determines (the spec, the
    optimizer transform, the precision, constants cast to the dtype), so a later model runs the very same
    executable."""

    def __init__(self, fn):
        self.jitted = jax.jit(fn)
        self.executables: dict = {}  # argument signature -> (executable, seconds its lowering and compile took)


_SHARED: dict = {}  # (spec, mode, native keys, dtype, device, x64) -> {function name: _Jitted}


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


# --------------------------------------------------------------------------------------------- native settings
class _Native:
    """Which framework defaults this model applies (``on(key)``: ``ModelBase.native``) and the record of those that
    differ from the spec in this run: ``settings`` ({key: the framework's API and value}) and ``differences``
    (prose lines; notes that are no difference go to ``notes``)."""

    def __init__(self, on: Callable[[str], bool], dtype: str):
        self.on, self.dtype = on, dtype
        self.settings: dict[str, str] = {}
        self.differences: list[str] = []
        self.notes: list[str] = []

    def differ(self, key: str, setting: str, prose: str) -> None:
        self.settings[key] = setting
        if prose not in self.differences:
            self.differences.append(prose)

    def value(self, key: str, framework, spec_value, setting: str, what: str):
        """``framework`` when ``key`` applies (recorded where it differs from ``spec_value`` in the run's dtype),
        else ``spec_value``."""
        if not self.on(key):
            return spec_value
        diff = value_diff(what, framework, spec_value, self.dtype)
        if diff:
            self.differ(key, setting, diff)
        return framework

    def epsilon(self, key: str, framework: tuple, spec_value: tuple, setting: str, what: str) -> tuple:
        """An (epsilon, inside the square root) pair: the framework's when ``key`` applies."""
        if not self.on(key):
            return spec_value
        if value_diff("", framework[0], spec_value[0], self.dtype) or framework[1] != spec_value[1]:
            where = {True: "inside sqrt(v + eps)", False: "outside, sqrt(v) + eps"}
            a, b = f"{framework[0]:g}", f"{spec_value[0]:g}"
            if a == b:  # a double against the spec's float32-exact value
                a, b = repr(framework[0]), repr(spec_value[0])
            self.differ(key, setting, f"{what} {a} {where[framework[1]]} (spec {b} {where[spec_value[1]]})")
        return framework


# ----------------------------------------------------------------------------------------------- the optimizers
@dataclass
class _Optimizer:
    """An optimizer as the train step uses it: ``update(params, state, grads, rates) -> (params, state)`` is pure
    (the jitted step of the first model of a key runs for every later one; ``rates`` holds this update's ``lr`` and
    the hand-written eps_hat Adam's ``alpha``), ``init(params)`` its initial state."""

    init: Callable
    update: Callable
    description: str  # info["optimizer"]
    bias: Callable | None = None  # t (1-based) -> sqrt(1-b2^t)/(1-b1^t) in double: eps_hat Adam's alpha = lr_t * bias


def _builtin(make: Callable, lr0: float, description: str) -> _Optimizer:
    """A built-in optax optimizer ``make(lr)``, built inside the step around that update's learning rate (a traced
    scalar: ``scale_by_learning_rate`` of a scalar keeps no state, so the state of ``make(lr0)`` fits every step)."""
    optax = _optax()

    def update(params, state, grads, rates):
        upd, state = make(rates["lr"]).update(grads, state, params)
        return optax.apply_updates(params, upd), state

    return _Optimizer(lambda params: make(lr0).init(params), update, description)


def _sgd(opt: SGD, nat: _Native, dtype: np.dtype) -> _Optimizer:
    """Plain: ``optax.sgd(lr_t)`` (``p + (-lr*g)``: the spec's ``p - lr*g`` exactly).  Momentum, accumulator form:
    ``optax.sgd(lr_t, momentum, nesterov)`` (``trace``: ``b = g + mu*b``, update ``-lr*b`` or ``-lr*(g + mu*b)``: the
    spec's); velocity form (Keras), which optax does not have: by hand.  Native momentum_form: optax's accumulator."""
    optax = _optax()
    mu, nesterov, form = float(opt.momentum), bool(opt.nesterov), opt.momentum_form
    if not mu:
        return _builtin(lambda lr: optax.sgd(lr), opt.lr, "built-in optax.sgd")
    if form == "velocity" and nat.on("momentum_form"):
        nat.differ("momentum_form", f"optax.sgd(lr, momentum={mu:g}, nesterov={nesterov})",
                   "SGD momentum: optax.sgd's accumulator form b = mu*b + g, w -= lr_t*b (spec: the velocity form "
                   "v = mu*v - lr_t*g, w += v): the same at a constant lr, apart after it changes")
        form = "accumulator"
    if form == "accumulator":
        return _builtin(lambda lr: optax.sgd(lr, momentum=mu, nesterov=nesterov), opt.lr,
                        f"built-in optax.sgd(momentum={mu:g}, nesterov={nesterov}): accumulator form")
    m = dtype.type(mu)

    def update(params, state, grads, rates):
        lr = rates["lr"]
        new_p, new_v = [], []
        for p, v, g in zip(params, state, grads):
            v = v * m - lr * g
            new_p.append(p + (m * v - lr * g) if nesterov else p + v)
            new_v.append(v)
        return new_p, new_v

    return _Optimizer(lambda params: [np.zeros(p.shape, dtype) for p in params], update,
                      f"hand-written SGD, velocity form (v = mu*v - lr_t*g; w += {'mu*v - lr_t*g' if nesterov else 'v'}"
                      "); optax.sgd has only the accumulator form")


def _adam_like(opt: Adam, nat: _Native, dtype: np.dtype, decay: tuple[float, bool] | None) -> _Optimizer:
    """Adam, and with ``decay`` = (weight decay, times lr) AdamW (the decay first, on the weights before the Adam
    update).  ``eps_v_hat``: the built-in ``optax.adam`` / ``optax.adamw`` (its decay is times lr; the other form is
    the decay by hand, then ``optax.adam``); ``eps_hat``, which no optax optimizer computes with a constant eps: by hand
    in the spec's order, ``alpha_t = lr_t*sqrt(1-b2^t)/(1-b1^t)`` computed in double on the host."""
    optax = _optax()
    name = "optax.adam" if decay is None else "optax.adamw"
    eps = nat.value("adam_epsilon", OPTAX_ADAM_EPS, opt.epsilon, f"{name}(eps={OPTAX_ADAM_EPS:g})",
                    f"Adam: {name} default eps")
    convention = opt.convention
    if convention != "eps_v_hat" and nat.on("adam_convention"):
        nat.differ("adam_convention", f"{name}: eps added to sqrt(v_hat) (eps_v_hat)",
                   f"Adam: {name} adds eps to sqrt(v_hat) (eps_v_hat; spec: {convention})")
        convention = "eps_v_hat"
    b1, b2 = opt.beta1, opt.beta2
    if nat.on("adam_one_minus_beta"):  # optax's defaults as Python doubles: 1 - b is rounded from the double
        b1, b2 = OPTAX_ADAM_BETAS
        diffs = [d for d in (value_diff(f"Adam: {name} b1", b1, opt.beta1, nat.dtype, " (a Python double)"),
                             value_diff(f"Adam: {name} b2", b2, opt.beta2, nat.dtype, " (a Python double)")) if d]
        for d in diffs + one_minus_beta_diffs({"beta_1": b1, "beta_2": b2}, opt, nat.dtype):
            nat.differ("adam_one_minus_beta", f"{name}(b1={b1!r}, b2={b2!r}) (Python doubles; 1 - b rounded from the "
                                              "double, b**t from the cast value)", d)
    dt = dtype.type
    wd, times_lr = decay if decay is not None else (0.0, True)

    def decayed(params, lr):  # w -= lr_t*wd*w, or wd*w
        factor = dt(wd) * lr if times_lr else dt(wd)
        return [p - factor * p for p in params]

    if convention == "eps_v_hat":
        if decay is None:
            return _builtin(lambda lr: optax.adam(lr, b1=b1, b2=b2, eps=eps), opt.lr, f"built-in optax.adam(eps={eps:g})")
        if times_lr:
            return _builtin(lambda lr: optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=wd), opt.lr,
                            f"built-in optax.adamw(eps={eps:g}, weight_decay={wd:g})")
        inner = _builtin(lambda lr: optax.adam(lr, b1=b1, b2=b2, eps=eps), opt.lr, "")

        def update_v_hat(params, state, grads, rates):
            return inner.update(decayed(params, rates["lr"]), state, grads, rates)

        return _Optimizer(inner.init, update_v_hat, f"hand-written decay w -= wd*w (optax.adamw's is times lr), then "
                                                    f"built-in optax.adam(eps={eps:g})")
    b1c, b2c, e = dt(1.0 - b1), dt(1.0 - b2), dt(eps)

    def init(params):
        zeros = [np.zeros(p.shape, dtype) for p in params]
        return zeros, [z.copy() for z in zeros]

    def update(params, state, grads, rates):
        if decay is not None:
            params = decayed(params, rates["lr"])
        alpha = rates["alpha"]
        ms, vs = state
        new_p, new_m, new_v = [], [], []
        for p, m, v, g in zip(params, ms, vs, grads):
            m = m + (g - m) * b1c
            v = v + (g * g - v) * b2c
            new_p.append(p - (m * alpha) / (jnp.sqrt(v) + e))
            new_m.append(m)
            new_v.append(v)
        return new_p, (new_m, new_v)

    def bias(t: int) -> float:
        return float(np.sqrt(1.0 - b2**t) / (1.0 - b1**t))

    what = "" if decay is None else f"; AdamW decay w -= {'lr_t*' if times_lr else ''}{wd:g}*w first"
    return _Optimizer(init, update, f"hand-written, spec convention ({convention}){what}; {name} adds a constant eps "
                                    "to sqrt(v_hat) (eps_v_hat)", bias)


def _adam(opt: Adam, nat: _Native, dtype: np.dtype) -> _Optimizer:
    return _adam_like(opt, nat, dtype, None)


def _adamw(opt: AdamW, nat: _Native, dtype: np.dtype) -> _Optimizer:
    """AdamW: native adamw_weight_decay is optax.adamw's 1e-4, adamw_decay_form its decay times lr."""
    wd = nat.value("adamw_weight_decay", OPTAX_ADAMW_WEIGHT_DECAY, opt.weight_decay,
                   f"optax.adamw(weight_decay={OPTAX_ADAMW_WEIGHT_DECAY:g})", "AdamW: optax.adamw default weight_decay")
    times_lr = opt.decay_times_lr
    if not times_lr and nat.on("adamw_decay_form"):
        nat.differ("adamw_decay_form", "optax.adamw: add_decayed_weights before scale_by_learning_rate (times lr)",
                   "AdamW: optax.adamw multiplies the decay by the learning rate (spec: w -= wd*w)")
        times_lr = True
    return _adam_like(opt, nat, dtype, (wd, times_lr))


def _rmsprop(opt: RMSprop, nat: _Native, dtype: np.dtype) -> _Optimizer:
    """``optax.rmsprop(lr_t, decay, eps, initial_scale, eps_in_sqrt)`` computes the spec in both epsilon placements
    (``scale_by_rms``: ``v = (1-decay)*g**2 + decay*v`` from initial_scale; ``rsqrt(v + eps)*g`` or
    ``g / (sqrt(v) + eps)``); native: optax's defaults decay 0.9, eps 1e-8 inside, initial_scale 0."""
    optax = _optax()
    d = OPTAX_RMSPROP
    rho = nat.value("rmsprop_rho", d["decay"], opt.rho, f"optax.rmsprop(decay={d['decay']:g})",
                    "RMSprop: optax.rmsprop default decay")
    eps, inside = nat.epsilon("rmsprop_epsilon", (d["eps"], d["eps_in_sqrt"]), (opt.epsilon, opt.epsilon_inside_sqrt),
                              f"optax.rmsprop(eps={d['eps']:g}, eps_in_sqrt={d['eps_in_sqrt']})",
                              "RMSprop: optax.rmsprop default eps")
    init = nat.value("rmsprop_accumulator", d["initial_scale"], opt.initial_accumulator,
                     f"optax.rmsprop(initial_scale={d['initial_scale']:g})", "RMSprop: optax.rmsprop initial_scale")
    return _builtin(lambda lr: optax.rmsprop(lr, decay=rho, eps=eps, initial_scale=init, eps_in_sqrt=inside), opt.lr,
                    f"built-in optax.rmsprop(decay={rho:g}, eps={eps:g}, initial_scale={init:g}, eps_in_sqrt={inside})")


def _adagrad(opt: Adagrad, nat: _Native, dtype: np.dtype) -> _Optimizer:
    """eps inside the square root: ``optax.adagrad(lr_t, initial_accumulator_value, eps)`` (``scale_by_rss``:
    ``a = g**2 + a``, ``rsqrt(a + eps)*g``); outside: by hand, ``p - (lr*g)/(sqrt(a) + eps)``.  Native: optax's
    defaults initial_accumulator_value 0.1, eps 1e-7 inside (the spec's defaults too)."""
    optax = _optax()
    d = OPTAX_ADAGRAD
    init = nat.value("adagrad_accumulator", d["initial_accumulator_value"], opt.initial_accumulator,
                     f"optax.adagrad(initial_accumulator_value={d['initial_accumulator_value']:g})",
                     "Adagrad: optax.adagrad default initial_accumulator_value")
    eps, inside = nat.epsilon("adagrad_epsilon", (d["eps"], True), (opt.epsilon, opt.epsilon_inside_sqrt),
                              f"optax.adagrad(eps={d['eps']:g}) (inside the square root)",
                              "Adagrad: optax.adagrad default eps")
    if inside:
        return _builtin(lambda lr: optax.adagrad(lr, initial_accumulator_value=init, eps=eps), opt.lr,
                        f"built-in optax.adagrad(initial_accumulator_value={init:g}, eps={eps:g})")
    e = dtype.type(eps)

    def update(params, state, grads, rates):
        lr = rates["lr"]
        new_p, new_a = [], []
        for p, a, g in zip(params, state, grads):
            a = a + g * g
            new_p.append(p - (lr * g) / (jnp.sqrt(a) + e))
            new_a.append(a)
        return new_p, new_a

    return _Optimizer(lambda params: [np.full(p.shape, init, dtype) for p in params], update,
                      "hand-written Adagrad, eps outside the square root (optax.adagrad adds it inside)")


# optimizer type -> build(opt, native record, dtype) -> _Optimizer (exact types: AdamW has its own entry)
OPTIMIZER_BUILDERS = {SGD: _sgd, Adam: _adam, AdamW: _adamw, RMSprop: _rmsprop, Adagrad: _adagrad}


def _clipping(spec: ModelSpec, nat: _Native, dtype: np.dtype) -> tuple[Callable, str | None]:
    """``clip(grads)`` between the gradients and the update, and its description.  Global: the built-in
    ``optax.clip_by_global_norm`` (stateless); per tensor: by hand, ``g * (max_norm / ||g||)`` where ``||g|| >
    max_norm``, as the oracle.  Native clip_scope: optax's global norm whatever the spec's scope."""
    clip = spec.clip
    if clip is None:
        return (lambda grads: grads), None
    scope = clip.scope
    if scope == "per_tensor" and nat.on("clip_scope"):
        nat.differ("clip_scope", f"optax.clip_by_global_norm({clip.max_norm:g})",
                   "gradient clipping: optax.clip_by_global_norm scales every gradient by one global norm "
                   "(spec: per tensor)")
        scope = "global"
    if nat.on("clip_epsilon"):
        nat.notes.append("gradient clipping: optax.clip_by_global_norm adds no epsilon to the norm: same as the spec")
    if scope == "global":
        tx = _optax().clip_by_global_norm(clip.max_norm)

        def clip_global(grads):
            return tx.update(grads, tx.init(grads))[0]

        return clip_global, (f"built-in optax.clip_by_global_norm({clip.max_norm:g}): select(norm < max_norm, g, "
                             "g / norm * max_norm), no epsilon")
    m = dtype.type(clip.max_norm)

    def clip_per_tensor(grads):
        out = []
        for g in grads:
            norm = jnp.sqrt(jnp.sum(g * g))
            out.append(jnp.where(norm > m, g * (m / norm), g))
        return out

    return clip_per_tensor, (f"hand-written per tensor: g * ({clip.max_norm:g} / ||g||) where ||g|| > "
                             f"{clip.max_norm:g} (optax has only the global norm)")


def _schedule(spec: ModelSpec, nat: _Native) -> tuple[Callable | None, str | None]:
    """Native lr_schedule: ``optax.exponential_decay(lr, every, factor, staircase=True)`` at the int32 update count
    (as ``optax.scale_by_schedule`` calls it): float32 arithmetic, also in a float64 run.  Recorded where its value
    differs from the spec's ``lr_at(t)`` in the run's dtype within the first 10000 updates (where the spec's is a
    normal number).  None: the host's ``lr_at(t)`` (aligned)."""
    s = spec.schedule
    if s is None:
        return None, None
    if not nat.on("lr_schedule"):
        return None, f"StepDecay: lr_t = spec.lr_at(t) in double on the host, passed to the step ({s.every}, {s.factor:g})"
    optax = _optax()
    schedule = optax.exponential_decay(spec.optimizer.lr, s.every, s.factor, staircase=True)
    counts = np.arange(10000, dtype=np.int32)
    dtype = np.dtype(nat.dtype)
    got = np.asarray(schedule(jnp.asarray(counts))).astype(dtype)
    want = np.array([spec.lr_at(int(t)) for t in counts]).astype(dtype)
    api = f"optax.exponential_decay({spec.optimizer.lr:g}, {s.every}, {s.factor:g}, staircase=True)"
    normal = np.abs(want) >= np.finfo(dtype).tiny  # not where both underflow (XLA flushes float32 denormals)
    if not np.array_equal(got[normal], want[normal]):
        t = int(np.argmax((got != want) & normal))
        nat.differ("lr_schedule", api, f"lr schedule: {api} computes in float32 from its int32 count: lr_t at "
                                       f"update {t} {float(got[t])!r} (spec {float(want[t])!r})")
    return (lambda t: schedule(t).astype(dtype)), f"native: {api} at the update count"


# What a layer type adds to ``info`` (under its lowercased name) and, in native mode, to the record:
# ``describe(layer, input shape, native record) -> note or None``.
def _bn_info(layer, shape, nat: _Native):
    return ("no BatchNorm in pure JAX: the spec's formula from primitive ops (batch mean and biased variance, "
            "moving = momentum*moving + (1 - momentum)*stat) in both modes: native = spec")


def _dropout_info(layer, shape, nat: _Native):
    if nat.on("dropout_rng"):
        if layer.rate:
            nat.differ("dropout_rng", "jax.random.bernoulli(fold_in(fold_in(PRNGKey(seed), step), layer), 1 - rate)",
                       "Dropout masks from JAX's RNG (jax.random.bernoulli): trajectories not comparable")
        return ("jax.random.bernoulli(fold_in(fold_in(PRNGKey(seed), step), layer index), 1 - rate); "
                "select(keep, x/(1 - rate), 0)")
    return "the harness's masks (dropout_masks of the step), arguments of the jitted step"


def _conv_info(layer, shape, nat: _Native):
    if layer.padding != "same":
        return None
    if nat.on("conv_same_padding"):
        return "lax.conv_general_dilated(padding='SAME'): TF's rule, the spec's (no difference)"
    return f"lax.conv_general_dilated with the spec's explicit pads {layer.pads(shape)} (TF's 'same')"


def _avgpool_info(layer, shape, nat: _Native):
    pads = layer.pads(shape)
    if nat.on("avgpool_count_pad"):
        if any(sum(p) for p in pads):
            nat.differ("avgpool_count_pad", "flax.linen.avg_pool(padding='SAME', count_include_pad=True)",
                       f"AveragePooling2D 'same' {layer.pool_size}/{layer.stride}: flax avg_pool divides by the "
                       f"window size, padded zeros counted (spec: in-image values only)")
        return "flax.linen.avg_pool(count_include_pad=True) written in lax: reduce_window(add) / pool_size**2"
    return "lax.reduce_window(add) over the zero-padded input / the number of in-image values per window"


def _layernorm_info(layer, shape, nat: _Native):
    eps = nat.value("layernorm_epsilon", FLAX_LAYERNORM_EPSILON, layer.epsilon,
                    f"flax.linen.LayerNorm(epsilon={FLAX_LAYERNORM_EPSILON:g})",
                    "LayerNorm: flax.linen.LayerNorm default epsilon")
    return f"the spec's formula from jnp ops, epsilon {eps:g}"


def _activation_info(layer, shape, nat: _Native):
    if layer.activation == "leaky_relu":
        slope = nat.value("leaky_relu_slope", JAX_LEAKY_RELU_SLOPE, layer.negative_slope,
                          f"jax.nn.leaky_relu(negative_slope={JAX_LEAKY_RELU_SLOPE:g})",
                          "leaky_relu: jax.nn.leaky_relu default negative_slope")
        return f"negative slope {slope:g}"
    if layer.activation == "gelu":
        tanh = layer.approximate == "tanh"
        if nat.on("gelu_approximation"):
            if not tanh:
                nat.differ("gelu_approximation", "jax.nn.gelu(approximate=True)",
                           "gelu: jax.nn.gelu default approximate=True, the tanh form (spec: exact, erf)")
            tanh = JAX_GELU_APPROXIMATE
        return f"jax.nn.gelu(approximate={tanh})"
    return None


LAYER_INFO = {BatchNorm: _bn_info, Dropout: _dropout_info, Conv2D: _conv_info, AveragePooling2D: _avgpool_info,
              LayerNorm: _layernorm_info, Activation: _activation_info}


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
                              "(the harness sets it for --dtype float64 runs)")
        if options.device == "cuda":
            gpus = _gpus()
            if not gpus:
                raise Unsupported("no CUDA device visible to jax")
            self.device = gpus[0]
        elif options.device == "cpu":
            self.device = jax.devices("cpu")[0]
        else:
            raise Unsupported(f"device {options.device} not supported (cpu, cuda)")
        switches = frozenset(k for k in NATIVE_KEYS if self.native(k))  # the framework defaults this model applies
        nat = _Native(switches.__contains__, options.dtype)
        self.jax_rng = nat.on("dropout_rng")  # dropout from jax.random instead of the harness's masks
        self.np_dtype = np.dtype(options.dtype)
        self.label_dtype = np.int64 if x64_enabled() else np.int32
        self.params = [jax.device_put(np.array(w, dtype=self.np_dtype), self.device) for w in weights]
        self.state = [jax.device_put(s.astype(self.np_dtype), self.device) for s in init_state(spec)]
        self.t = 0
        self.fast = bool(options.fast)
        self.random = bool(spec.random_layers)
        default_precision = nat.on("matmul_precision")
        precision = None if default_precision else lax.Precision.HIGHEST
        info: dict = {"jit": True, "scan": self.fast, "device": str(self.device), "x64": x64_enabled(),
                      "threads": "not settable after start-up (XLA_FLAGS); requested "
                                 f"{options.threads}" if options.threads else "XLA default",
                      "precision": "XLA default" if default_precision else "HIGHEST"}
        if default_precision and options.device == "cuda" and options.dtype == "float32":
            nat.differ("matmul_precision", "jax.lax.Precision.DEFAULT (XLA's default: TF32 on the GPU)",
                       "matmul/conv precision: XLA default (float32 may use TF32 on the GPU)")

        optimizer = build_optimizer(spec.optimizer, nat, self.np_dtype)
        self.opt_state = jax.device_put(optimizer.init(self.params), self.device)
        self.bias_of = optimizer.bias
        update = optimizer.update
        info["optimizer"] = optimizer.description
        clip, clip_note = _clipping(spec, nat, self.np_dtype)
        schedule, schedule_note = _schedule(spec, nat)
        for name, note in (("clip", clip_note), ("schedule", schedule_note)):
            if note is not None:
                info[name] = note
        native_form = nat.on("loss_form")
        loss_of_out = loss_of(spec, native_form)
        user_name = LOSS_FORMS[spec.loss.kind][2]
        if native_form:
            info["loss"] = f"{user_name}, {spec.loss.reduction} over the batch"
            if spec.loss.kind in ("binary_crossentropy", "softmax_crossentropy"):
                nat.notes.append(f"loss: optax's {spec.loss.kind} is already stable from logits: same as the spec")
        else:
            info["loss"] = f"{spec.loss.kind} (the spec's formula), {spec.loss.reduction} over the batch"
        if spec.loss.class_weights:
            info["class_weights"] = "per-sample loss times w[y], the mean divides by N: written by the user in pure " \
                                    "JAX, native = spec"
        l2 = self.np_dtype.type(spec.loss.l2)
        kernels = [j for j, (_, _, p) in enumerate(spec.param_entries()) if p.role == "kernel"] if spec.loss.l2 else []
        if kernels:
            info["l2"] = "l2 * sum(kernel**2) added to the loss: written by the user in pure JAX, native = spec"
        for layer, shape in zip(spec.layers, spec.input_shapes()):
            describe = LAYER_INFO.get(type(layer))
            note = describe(layer, shape, nat) if describe is not None else None
            if note is not None:
                info.setdefault(type(layer).__name__.lower(), note)

        # The jitted functions take everything that varies between models of one key as arguments: weights, optimizer
        # state, BatchNorm state, the step's dropout noise (aligned: the masks, one per Dropout layer; native: the
        # uint32 pair (seed, step) the key is made from) and the update's host scalars (``hyper``: the update count
        # t, lr_t, and the eps_hat Adam's alpha_t and bias correction).
        jax_rng = self.jax_rng

        def training_pass(noise):
            if jax_rng:
                return _Pass(True, precision, key=jax.random.fold_in(jax.random.PRNGKey(noise[0]), noise[1]),
                             switches=switches)
            return _Pass(True, precision, masks=dict(zip(spec.random_layers, noise)), switches=switches)

        def loss_fn(params, state, x, y, noise):
            out, new_state = run(spec, params, state, x, training_pass(noise))
            loss = loss_of_out(out, y)
            for j in kernels:  # the L2 penalty on every kernel
                loss = loss + l2 * jnp.sum(params[j] * params[j])
            return loss, new_state

        def rates(hyper):
            if schedule is None:  # the host's lr_at(t) in double
                return {"lr": hyper["lr"], "alpha": hyper["alpha"]}
            lr = schedule(hyper["t"])
            return {"lr": lr, "alpha": lr * hyper["bias"]}

        def step(params, opt_state, state, x, y, hyper, noise):
            (loss, state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, state, x, y, noise)
            params, opt_state = update(params, opt_state, clip(grads), rates(hyper))
            return params, opt_state, state, loss

        def steps_scan(params, opt_state, state, xs, ys, hypers, noises):
            def body(carry, inp):
                p, o, s = carry
                p, o, s, loss = step(p, o, s, *inp)
                return (p, o, s), loss

            (params, opt_state, state), losses = lax.scan(body, (params, opt_state, state), (xs, ys, hypers, noises))
            return params, opt_state, state, losses

        def gradients(params, state, x, y, noise):  # the new state is dropped: gradients() moves nothing
            (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, state, x, y, noise)
            return loss, grads

        def predict(params, state, x):
            return predict_from_output(spec, run(spec, params, state, x, _Pass(False, precision,
                                                                               switches=switches))[0])

        self.compile_s: dict = {}
        self.compile_reused: dict = {}
        key = (spec, options.mode, switches, options.dtype, str(self.device), x64_enabled())
        shared = _SHARED.get(key)
        if shared is None:  # the first model of this key: its functions are the ones every later model runs
            shared = _SHARED[key] = {"step": _Jitted(step), "scan": _Jitted(steps_scan),
                                     "gradients": _Jitted(gradients), "predict": _Jitted(predict)}
        self._step, self._scan, self._grads, self._predict = (
            _AOT(shared[n], n, self.compile_s, self.compile_reused) for n in ("step", "scan", "gradients", "predict"))
        if options.mode == "native":
            diffs = nat.differences + [n for n in nat.notes if n not in nat.differences]
            info["native_settings"] = dict(nat.settings)
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

    def _hyper(self, t: int) -> dict:
        """The host scalars of update ``t`` (0-based: t updates applied before it): the count, ``lr_t =
        spec.lr_at(t)``, and for the hand-written eps_hat Adam ``bias = sqrt(1-b2^(t+1))/(1-b1^(t+1))`` and ``alpha =
        lr_t * bias``, computed in double, cast once (zeros for the optimizers that keep their own step count)."""
        lr = self.spec.lr_at(t)
        bias = self.bias_of(t + 1) if self.bias_of is not None else 0.0
        dt = self.np_dtype.type
        return {"t": np.int32(t), "lr": dt(lr), "alpha": dt(lr * bias), "bias": dt(bias)}

    def _hypers(self, t: int, k: int) -> dict:
        steps = [self._hyper(t + j) for j in range(k)]
        return {name: np.stack([h[name] for h in steps]) for name in steps[0]}

    def _noise(self, t: int, batch_size: int):
        """The dropout noise of training step ``t`` (updates applied before it): aligned, the harness's masks (one per
        Dropout layer, ``[]`` when none); native dropout_rng, the uint32 pair (seed, step) JAX's key is made from."""
        if self.jax_rng:
            return np.array([self.options.seed % 2**32, t % 2**32], np.uint32)
        return self.dropout_masks(t, batch_size) if self.random else []

    def _noises(self, t: int, k: int, batch_size: int):
        """The noise of steps t..t+k-1 stacked for lax.scan: (k, 2) keys, or per Dropout layer (k, B, ...) masks."""
        steps = [self._noise(t + j, batch_size) for j in range(k)]
        if self.jax_rng:
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
        hyper = jax.device_put(self._hyper(self.t), self.device)
        self.t += 1
        self.params, self.opt_state, self.state, loss = self._step(self.params, self.opt_state, self.state, x, y,
                                                                   hyper, noise)
        self._note_trace()
        return float(loss)

    def train_steps(self, xs, ys) -> np.ndarray:
        k = len(xs)
        if self.fast:  # the whole stack in one compiled call
            xs, ys = self._in(xs, ys)
            noises = jax.device_put(self._noises(self.t, k, xs.shape[1]), self.device)
            hypers = jax.device_put(self._hypers(self.t, k), self.device)
            self.params, self.opt_state, self.state, losses = self._scan(self.params, self.opt_state, self.state,
                                                                         xs, ys, hypers, noises)
            self.t += k
        else:  # one jitted step per batch; NumPy views go straight into the compiled step, which transfers them
            if not isinstance(xs, list):
                xs = np.asarray(xs, dtype=self.np_dtype)
                ys = np.asarray(ys, dtype=self.label_dtype if self.spec.loss.integer_labels else self.np_dtype)
            losses = []
            for j in range(k):
                noise = self._noise(self.t, xs[j].shape[0])
                hyper = self._hyper(self.t)
                self.t += 1
                self.params, self.opt_state, self.state, loss = self._step(self.params, self.opt_state, self.state,
                                                                           xs[j], ys[j], hyper, noise)
                losses.append(loss)
            losses = jnp.stack(losses)
        self._note_trace()
        return np.asarray(losses, dtype=np.float64)  # one host sync for the whole stack

    def gradients(self, x, y):
        """Training-mode loss (L2 penalty included) and unclipped gradients at step ``t``'s dropout noise (the next
        train_step's); weights, optimizer state and BatchNorm state stay as they are."""
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

    def gpu_peak_mb(self) -> float | None:
        """Peak MiB in use on the model's GPU in this process, from XLA's allocator (``Device.memory_stats()
        ["peak_bytes_in_use"]``: bytes handed to buffers, not the pool XLA preallocates); None on the CPU, and where
        the allocator keeps no such statistic (``memory_stats()`` None or without the key, e.g.
        ``XLA_PYTHON_CLIENT_ALLOCATOR=platform``)."""
        if self.options.device != "cuda":
            return None
        return xla_peak_mb(self.device.memory_stats())
