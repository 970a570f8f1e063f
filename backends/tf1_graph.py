"""TF1 graph mode: ``tf.compat.v1`` placeholders and variables in a ``tf.Graph`` of their own, one ``Session``, one
``session.run`` per step, ``tf.compat.v1.train`` optimizers, gradients from ``tf.compat.v1.gradients``.

Layouts: TensorFlow's own are the canonical ones (dense ``(in, out)``, conv HWIO via ``tf.nn.conv2d`` NHWC, flatten in
(h, w, c) order), so weights go in and come out as they are: no conversion anywhere.

Layers and losses are ``tf2_tape``'s op builders (the same TF ops in a graph: ``"SAME"`` convolution / average
pooling, ``tf.nn.leaky_relu``, ``tf.nn.gelu``, LayerNorm from ``tf.nn.moments``...), except BatchNorm and Dropout,
whose native forms are TF1's, and the loss rules native mode changes (:data:`LOSS_RULES`).  TF1 has no LayerNorm op
(``tf.compat.v1.layers`` raises "`LayerNormalization` is not available with Keras 3", ``tf.contrib.layers.layer_norm``
is gone) and no gelu (``tf.nn.gelu`` is exported with ``v1=[]``): both are written with TF ops, native = spec.

Aligned optimizers (:data:`OPTIMIZER_BUILDERS`): the built-in ``tf.compat.v1.train`` optimizer wherever it computes the
spec, every hyperparameter a ``tf.constant`` of the run's dtype, the learning rate the tensor ``tf2_tape.schedule_lr``
computes from the update counter (``lr * factor ** (t // every)``); TF ops where it cannot.  ``info["optimizer"]``
says which ran (``"built-in tf.compat.v1.train.X..."`` or ``"hand-written ..."``):

* SGD: ``GradientDescentOptimizer``; with momentum ``MomentumOptimizer(momentum, use_nesterov)``, whose
  ``ApplyMomentum`` kernel (``tensorflow/python/training/momentum.py``) is the spec's ``"accumulator"`` form
  (``accum = accum * mu + g``; ``var -= accum * lr``, Nesterov ``var -= g * lr + accum * mu * lr``); the
  ``"velocity"`` form (Keras) is written with TF ops.
* Adam: ``AdamOptimizer`` for eps_hat (its fused ``ApplyAdam`` kernel is the eps-hat form in Keras' order:
  ``alpha = lr*sqrt(1-b2^t)/(1-b1^t)``, ``m += (g - m)*(1-b1)``, ``v += (g*g - v)*(1-b2)``, ``var -= m*alpha/(sqrt(v) +
  eps)``; the beta powers accumulated by one multiplication per step, not ``pow``); eps_v_hat with TF ops.
* AdamW: TF1 has none (tfa / tf.contrib AdamW are gone): the decoupled decay ``w -= lr * wd * w`` (or ``wd * w``) is
  written with TF ops and ordered before the built-in ``AdamOptimizer`` (or the eps_v_hat update); native = spec for
  the decay.
* RMSprop: ``RMSPropOptimizer(decay=rho, momentum=0, epsilon)`` (``tensorflow/python/training/rmsprop.py``:
  ``ms += (g*g - ms) * (1 - rho)``, ``mom = mom * 0 + lr * g / sqrt(ms + eps)``, ``var -= mom``) for epsilon inside the
  square root, its ``"rms"`` slot (``get_slot``) set to the spec's initial accumulator after initialization (TF1 starts
  it at 1.0); epsilon outside with TF ops.
* Adagrad: ``AdagradOptimizer`` (``tensorflow/python/training/adagrad.py``: ``ApplyAdagrad`` ``accum += g*g``,
  ``var -= lr * g * rsqrt(accum)``, no epsilon, initial accumulator > 0 only) when the spec's epsilon is 0; otherwise
  TF ops.
Clipping: ``tf.clip_by_global_norm`` / ``tf.clip_by_norm`` on the gradients before ``apply_gradients``.

Native mode (``ModelBase.native(key)``, one key at a time with ``extra["native_only"]``) is what a TF1 tutorial
writes (:data:`NATIVE_DEFAULTS`): ``tf.compat.v1.train`` optimizers with Python floats and their defaults
(``AdamOptimizer(epsilon=1e-08)``; ``RMSPropOptimizer(decay=0.9, epsilon=1e-10)`` with the ``rms`` slot from ones;
``AdagradOptimizer(initial_accumulator_value=0.1)`` without epsilon; ``MomentumOptimizer``'s accumulator form),
``tf.compat.v1.train.exponential_decay(lr, global_step, every, factor, staircase=True)`` (float32),
``tf.clip_by_global_norm``, ``l2 * tf.nn.l2_loss(kernel)`` (``sum(w**2) / 2``), class weights through
``tf.compat.v1.losses`` (``compute_weighted_loss``: ``Reduction.SUM_BY_NONZERO_WEIGHTS``, the losses and weights cast
to float32, ``tensorflow/python/ops/losses/losses_impl.py``), ``tf.compat.v1.nn.leaky_relu`` (alpha 0.2),
``tf.compat.v1.layers.batch_normalization`` and ``tf.compat.v1.nn.dropout``.  Each key whose default differs from the
spec in this run is listed in ``info["native_settings"]`` and ``info["native_differences"]``.  Keys TF1 has no default
for are never applied: the conv / pooling rules are the spec's, LayerNorm / gelu / AdamW are hand-written,
``sparse_categorical_crossentropy`` is ``-log p[y]`` as a TF1 tutorial writes it, TF1 adds no clipping epsilon.

Quirks (measured, see ``shared/guides/numerics.md``): TF1 optimizers turn Python-float hyperparameters into float32
tensors -- the learning rate, betas, epsilon *and* the beta-power accumulators -- and cast them to float64 at each
update, so a float64 run with Python floats is not a float64 optimizer (native ``lr_precision``).  The loss is fetched
in the same ``session.run`` as the update, under a control dependency that makes the update wait for it.

Layers and optimizers come from :data:`LAYER_BUILDERS` / :data:`OPTIMIZER_BUILDERS` (``backends.base.lookup`` at
construction: an unknown type is ``Unsupported("tf1 has no <Type>")``).

Training and inference: one graph holds two forward passes over the same variables, the training pass (batch
statistics, dropout) feeding the loss, gradients and train op, the inference pass (moving statistics, no dropout)
feeding ``predict``.  BatchNorm's moving statistics are non-trainable variables; their assign ops go into the graph's
``UPDATE_OPS`` collection and the train op groups them with the optimizer's update, as TF1 code does (there with
``tf.control_dependencies(UPDATE_OPS)`` around ``minimize``): they run with ``train_step`` and never with the
``gradients`` fetch.  The update counter (the schedule's global step) is incremented after the update.  Aligned
dropout multiplies by the harness's masks, fed through placeholders of shape ``(None, ...)`` (one per Dropout layer),
the same masks for ``gradients`` at step t and the update of step t.  Aligned BatchNorm is ``tf2_tape.bn_aligned``.

Native BatchNorm is the graph ``tf.compat.v1.layers.batch_normalization(x, training=True)`` builds with its defaults
(the TF 2.x Keras-2 ``BatchNormalization`` V1 layer: ``momentum=0.99, epsilon=1e-3, fused=None``; that function itself
is gone from this TensorFlow with Keras 3, "`batch_normalization` is not available with Keras 3", so its ops are
written here).  ``fused=None`` means the fused kernel for a 4-D input of a dtype it takes (float16/bfloat16/float32:
``FusedBatchNormV3`` has no float64), else the plain ops:

* fused (4-D, float32): ``tf.compat.v1.nn.fused_batch_norm(is_training=True)``, which normalises with the biased
  variance but *returns the batch variance with Bessel's correction* (measured: ``var * n / (n - 1)``), and the layer
  stores it as is (``_bessels_correction_test_only = True``): the moving variance is the unbiased one.  In a graph the
  layer does not use the kernel's own averaging: ``moving -= (moving - stat) * (1 - momentum)`` with ``momentum`` a
  float32 tensor (so ``1 - f32(0.99)``, the spec's value).
* plain (2-D, or float64): ``tf.nn.moments`` (biased) and ``tf.nn.batch_normalization(..., 1e-3)`` (epsilon a Python
  float: 0.001 in a float64 run), ``moving -= (moving - stat) * decay`` with ``decay`` the Python double ``1 - 0.99``
  made a float32 tensor and then cast (0.0099999998, not the spec's ``1 - f32(0.99)`` = 0.0099999905).

With all three BatchNorm keys native the fused path runs the kernel itself; with some of them, the same values are
applied key by key with ``tf.nn.moments`` / ``tf.nn.batch_normalization`` (momentum: TF1's decay and update form;
epsilon: 1e-3 as the path applies it; variance: unbiased on the fused path, biased on the plain one).
Native dropout is ``tf.compat.v1.nn.dropout(x, rate=...)`` with TensorFlow's RNG (graph seed: the run's seed).
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from models.spec import SGD, Adagrad, Adam, AdamW, BatchNorm, Dropout, ModelSpec, RMSprop, init_state  # noqa: E402

from . import tf2_tape  # noqa: E402
from .base import BuildOptions, Capabilities, ModelBase, Unsupported, lookup  # noqa: E402
from .tf2_tape import (  # noqa: E402
    Ctx,
    NativeNotes,
    adagrad_update,
    adam_update,
    bn_apply,
    clip_grads,
    clip_notes,
    decay_update,
    environment_info,
    f32,
    fmt,
    forward,
    hyper,
    kernels,
    l2_penalty,
    layer_notes,
    loss_fn,
    lr_notes,
    new_state,
    per_sample_loss,
    predict_fn,
    reduce_loss,
    rmsprop_update,
    sample_weights,
    schedule_lr,
    set_tf32,
    sgd_update,
    tf_device,
    value_diff,
)

v1 = tf.compat.v1

CAPABILITIES = Capabilities(
    devices=("cpu", "cuda"),
    notes=("tf.compat.v1 graph + Session; tf.compat.v1.train optimizers with float64 hyperparameter tensors",),
)
BACKEND = "tf1"

# TF1's defaults (tensorflow/python/training/*.py), as TF1 applies them: hyperparameters given as Python floats become
# float32 tensors (so f32 here); initial accumulators are filled in the variable's dtype
TF1_ADAM_DEFAULT_EPS = 1e-8  # adam.py AdamOptimizer(learning_rate=0.001, beta1=0.9, beta2=0.999, epsilon=1e-08)
TF1_RMSPROP_DECAY = 0.9  # rmsprop.py RMSPropOptimizer(decay=0.9, momentum=0.0, epsilon=1e-10); _create_slots: the
TF1_RMSPROP_EPSILON = 1e-10  # "rms" slot from init_ops.ones_initializer; ApplyRMSProp: lr * g / sqrt(ms + epsilon)
TF1_RMSPROP_INITIAL = 1.0
TF1_ADAGRAD_INITIAL = 0.1  # adagrad.py AdagradOptimizer(initial_accumulator_value=0.1); ApplyAdagrad has no epsilon
TF1_BN_MOMENTUM = 0.99  # tf.compat.v1.layers.batch_normalization(momentum=0.99, epsilon=1e-3, fused=None)
TF1_BN_EPSILON = 1e-3
FUSED_DTYPES = (tf.float16, tf.bfloat16, tf.float32)  # FusedBatchNormV3's T

NATIVE_DEFAULTS = {
    "adam_epsilon": "tf.compat.v1.train.AdamOptimizer(epsilon=1e-08)",
    "adam_convention": "tf.compat.v1.train.AdamOptimizer: eps added to sqrt(v) (eps_hat)",
    "lr_precision": "tf.compat.v1.train.*Optimizer(<Python floats>): float32 tensors, cast per update",
    "matmul_precision": "tf.config.experimental.enable_tensor_float_32_execution(True) (TF's default)",
    "class_weight_denominator": "tf.compat.v1.losses.sparse_softmax_cross_entropy(weights=w[y]) / "
                                "compute_weighted_loss: Reduction.SUM_BY_NONZERO_WEIGHTS, in float32",
    "batchnorm_momentum": "tf.compat.v1.layers.batch_normalization(momentum=0.99)",
    "batchnorm_epsilon": "tf.compat.v1.layers.batch_normalization(epsilon=1e-3)",
    "batchnorm_variance": "tf.compat.v1.layers.batch_normalization(fused=None): the fused kernel's unbiased variance "
                          "stored (4-D float32), the biased one otherwise",
    "dropout_rng": "tf.compat.v1.nn.dropout(x, rate): TensorFlow's RNG",
    "leaky_relu_slope": "tf.compat.v1.nn.leaky_relu(x) (alpha=0.2)",
    "momentum_form": "tf.compat.v1.train.MomentumOptimizer(lr, momentum): accum = mu * accum + g; w -= lr * accum",
    "rmsprop_rho": "tf.compat.v1.train.RMSPropOptimizer(decay=0.9)",
    "rmsprop_epsilon": "tf.compat.v1.train.RMSPropOptimizer(epsilon=1e-10): sqrt(ms + eps)",
    "rmsprop_accumulator": "tf.compat.v1.train.RMSPropOptimizer(): the 'rms' slot starts at 1.0",
    "adagrad_accumulator": "tf.compat.v1.train.AdagradOptimizer(initial_accumulator_value=0.1)",
    "adagrad_epsilon": "tf.compat.v1.train.AdagradOptimizer(): no epsilon, w -= lr * g * rsqrt(a)",
    "l2_regularization": "l2 * tf.nn.l2_loss(kernel) = l2 * sum(kernel**2) / 2",
    "clip_scope": "tf.clip_by_global_norm(grads, max_norm)",
    "lr_schedule": "tf.compat.v1.train.exponential_decay(lr, global_step, every, factor, staircase=True)",
}


def probe() -> str:
    return tf.__version__


def devices() -> list[str]:
    return ["cpu"] + (["cuda"] if tf.config.list_physical_devices("GPU") else [])


# --------------------------------------------------------------------------------------------------------- layers
BN_KEYS = ("batchnorm_momentum", "batchnorm_epsilon", "batchnorm_variance")


def fused_path(x_ndims: int, dtype) -> bool:
    """Whether ``tf.compat.v1.layers.batch_normalization(fused=None)`` takes the fused kernel for this input."""
    return x_ndims == 4 and tf.as_dtype(dtype) in FUSED_DTYPES


def tf1_bn_decay(fused: bool, dtype):
    """``1 - momentum`` as the TF1 layer computes it in a graph: ``1 - f32(0.99)`` on the fused path (momentum a
    float32 tensor), the Python double ``1 - 0.99`` made a float32 tensor on the plain one; cast to the run's dtype."""
    if fused:
        return tf.cast(1.0 - tf.convert_to_tensor(TF1_BN_MOMENTUM), dtype)
    return tf.cast(tf.convert_to_tensor(1.0 - TF1_BN_MOMENTUM), dtype)


def _bn_tf1_fused(ctx, i, layer, p, s, x):
    """Every BatchNorm key native, 4-D float32: the fused kernel tf.compat.v1.layers.batch_normalization runs."""
    mm, mv = s["moving_mean"], s["moving_variance"]
    if not ctx.training:
        y, _, _ = v1.nn.fused_batch_norm(x, p["gamma"], p["beta"], mean=mm, variance=mv, epsilon=TF1_BN_EPSILON,
                                         is_training=False)
        return y
    # the batch mean and the batch variance *with* Bessel's correction (stored as is by the layer)
    y, mean, var = v1.nn.fused_batch_norm(x, p["gamma"], p["beta"], epsilon=TF1_BN_EPSILON, is_training=True)
    decay = tf1_bn_decay(True, mm.dtype)
    ctx.new_state[i] = {"moving_mean": mm - (mm - mean) * decay, "moving_variance": mv - (mv - var) * decay}
    return y


def _batchnorm(ctx, i, layer, p, s, x):
    """Aligned: ``tf2_tape.bn_aligned``; native: the TF1 layer's defaults, key by key (module docstring)."""
    active = [ctx.native(k) for k in BN_KEYS]
    fused = fused_path(len(x.shape), ctx.dtype)
    if not any(active):
        return tf2_tape.bn_aligned(ctx, i, layer, p, s, x)
    if all(active) and fused:
        return _bn_tf1_fused(ctx, i, layer, p, s, x)
    native_mom, native_eps, native_var = active
    eps = TF1_BN_EPSILON if native_eps else tf.constant(layer.epsilon, ctx.dtype)
    unbiased = fused if native_var else layer.unbiased_moving_variance
    if native_mom:  # TF1's form: moving -= (moving - stat) * decay == moving * (1 - decay) + stat * decay
        return bn_apply(ctx, i, layer, p, s, x, eps, None, tf1_bn_decay(fused, ctx.dtype), unbiased, subtract=True)
    mom = tf.constant(layer.momentum, ctx.dtype)
    return bn_apply(ctx, i, layer, p, s, x, eps, mom, 1 - mom, unbiased)


def _dropout(ctx, i, layer, p, s, x):
    if not ctx.training or layer.rate == 0:
        return x
    if ctx.native("dropout_rng"):  # TF1's dropout and RNG (the graph-level seed is the run's)
        return v1.nn.dropout(x, rate=layer.rate)
    return x * ctx.masks[i]  # the harness's mask, fed through a placeholder


LAYER_BUILDERS = {**tf2_tape.LAYER_BUILDERS, BatchNorm: _batchnorm, Dropout: _dropout}


def tf1_bn_used(layer, shape, dtype: str):
    """(momentum, 1 - momentum, epsilon, unbiased, note) as tf.compat.v1.layers.batch_normalization applies them."""
    if fused_path(len(shape) + 1, dtype):
        decay = float(np.float32(1.0) - np.float32(TF1_BN_MOMENTUM))
        return (float(np.float32(TF1_BN_MOMENTUM)), decay, float(np.float32(TF1_BN_EPSILON)), True,
                " (tf.compat.v1.layers.batch_normalization default, fused FusedBatchNormV3 path)")
    decay = float(np.float32(1.0 - TF1_BN_MOMENTUM))
    return (1.0 - decay, decay, TF1_BN_EPSILON, False,
            " (tf.compat.v1.layers.batch_normalization default, non-fused path: 1 - 0.99 a float32 tensor)")


# ---------------------------------------------------------------------------------------------------------- losses
def _tf1_reduce(spec: ModelSpec, per_sample, y, native=tf2_tape.no_native):
    """Native ``class_weight_denominator``: the class weights through ``tf.compat.v1.losses`` (what
    ``sparse_softmax_cross_entropy(labels, logits, weights=w[y])`` does after its per-sample loss):
    ``compute_weighted_loss`` with ``Reduction.SUM_BY_NONZERO_WEIGHTS``, the weighted sum divided by the number of
    samples whose weight is not 0, computed in float32 and cast back."""
    if spec.loss.class_weights and spec.loss.reduction == "mean" and native("class_weight_denominator"):
        return v1.losses.compute_weighted_loss(per_sample, weights=sample_weights(spec, y, per_sample.dtype))
    return reduce_loss(spec, per_sample, y, native)


def _tf1_penalty(spec: ModelSpec, params, native=tf2_tape.no_native):
    """Native ``l2_regularization``: ``l2 * tf.nn.l2_loss(kernel)`` summed over the kernels (``l2_loss`` is
    ``sum(t**2) / 2``, ``tensorflow/python/ops/gen_nn_ops.py`` L2Loss), half the spec's penalty."""
    if spec.loss.l2 and native("l2_regularization"):
        ks = kernels(spec, params)
        return tf.constant(spec.loss.l2, ks[0].dtype) * tf.add_n([tf.nn.l2_loss(k) for k in ks])
    return l2_penalty(spec, params, native)


# TF1 has no Keras loss: sparse categorical crossentropy is -log p[y] as TF1 tutorials write it (= the spec)
LOSS_RULES = {"per_sample": per_sample_loss, "reduce": _tf1_reduce, "penalty": _tf1_penalty}


def tf1_schedule(lr: float, t, schedule):
    """tf.compat.v1.train.exponential_decay(lr, global_step, every, factor, staircase=True): ``lr`` a float32 tensor,
    ``lr * factor ** floor(t / every)`` in float32 (``tensorflow/python/keras/optimizer_v2/legacy_learning_rate_decay.py``);
    eagerly it returns a function."""
    return v1.train.exponential_decay(lr, t, schedule.every, schedule.factor, staircase=True)


# ----------------------------------------------------------------------------------------------------- optimizers
# optimizer type -> builder(model, opt, pairs) -> the update op; sets info["optimizer"] and notes what native mode
# changed.  Each builds the effective hyperparameters (the spec's, with TF1's default substituted for every active
# native key) and runs the built-in tf.compat.v1.train optimizer where it computes exactly those.
def _sgd(model, opt, pairs):
    mu, form = opt.momentum, opt.momentum_form
    if mu > 0 and form != "accumulator" and model.native("momentum_form"):
        model.note("momentum_form", f"tf.compat.v1.train.MomentumOptimizer(lr, momentum={fmt(mu)}, "
                   f"use_nesterov={opt.nesterov}): accum = mu * accum + g", f"SGD momentum in TF1's accumulator form "
                   f"(spec {form})")
        form = "accumulator"
    if mu == 0:
        model.info["optimizer"] = f"built-in tf.compat.v1.train.GradientDescentOptimizer; {model.hp_words()}"
        return v1.train.GradientDescentOptimizer(learning_rate=model.lr_t).apply_gradients(pairs)
    if form == "accumulator":
        model.info["optimizer"] = (f"built-in tf.compat.v1.train.MomentumOptimizer; MomentumOptimizer(momentum="
                                   f"{fmt(mu)}, use_nesterov={opt.nesterov}), {model.hp_words()}")
        return v1.train.MomentumOptimizer(learning_rate=model.lr_t, momentum=model.hp(mu),
                                          use_nesterov=opt.nesterov).apply_gradients(pairs)
    params = [p for _, p in pairs]
    model.info["optimizer"] = ("hand-written SGD, momentum as a velocity (v = mu * v - lr * g; w += "
                               f"{'mu * v - lr * g' if opt.nesterov else 'v'}); MomentumOptimizer has the accumulator "
                               "form only")
    return tf.group(*sgd_update(params, [g for g, _ in pairs], model.slots(params, 0.0, "velocity"), model.lr_t,
                                tf.constant(mu, model.dtype), opt.nesterov, form))


def _adam_settings(model, opt):
    """Effective (epsilon, convention) of an Adam / AdamW and their notes (TF1 takes the spec's betas)."""
    dt, name = model.options.dtype, type(opt).__name__
    eps, conv = opt.epsilon, opt.convention
    if model.native("adam_epsilon"):
        eps = f32(TF1_ADAM_DEFAULT_EPS)  # a Python float: a float32 tensor
        model.note("adam_epsilon", NATIVE_DEFAULTS["adam_epsilon"],
                   value_diff(f"{name} epsilon", eps, opt.epsilon, dt, nominal=TF1_ADAM_DEFAULT_EPS))
    if model.native("adam_convention") and conv != "eps_hat":
        conv = "eps_hat"
        model.note("adam_convention", NATIVE_DEFAULTS["adam_convention"],
                   f"{name} epsilon convention eps_hat (spec {opt.convention})")
    return eps, conv


def _adam_op(model, opt, pairs, eps, conv):
    """The Adam update: the built-in AdamOptimizer (eps_hat) or TF ops (eps_v_hat)."""
    if conv == "eps_hat":
        if model.native("lr_precision") and model.dtype == tf.float64:
            model.note("lr_precision", model.lr_api(),
                       "Adam beta powers accumulated in float32 variables (beta1^t, beta2^t)")
        return "built-in tf.compat.v1.train.AdamOptimizer", v1.train.AdamOptimizer(
            learning_rate=model.lr_t, beta1=model.hp(opt.beta1), beta2=model.hp(opt.beta2),
            epsilon=model.hp(eps)).apply_gradients(pairs)
    params = [p for _, p in pairs]
    hp = hyper({"beta1": opt.beta1, "beta2": opt.beta2, "epsilon": eps}, model.dtype)
    m, v = model.slots(params, 0.0, "m"), model.slots(params, 0.0, "v")
    step = tf.cast(model.step + 1, model.dtype)
    return (f"hand-written, spec convention ({conv})",
            tf.group(*adam_update(params, [g for g, _ in pairs], m, v, step, model.lr_t, hp, conv)))


def _adam(model, opt, pairs):
    eps, conv = _adam_settings(model, opt)
    what, op = _adam_op(model, opt, pairs, eps, conv)
    model.info["optimizer"] = (f"{what}; {model.hp_words()}" if conv == "eps_hat" else
                               f"{what}; AdamOptimizer adds a constant eps to sqrt(v) (eps_hat) only")
    return op


def _adamw(model, opt, pairs):
    """TF1 has no AdamW: the decay with TF ops, then the Adam update on the decayed weights."""
    eps, conv = _adam_settings(model, opt)
    params = [p for _, p in pairs]
    with tf.control_dependencies([g for g, _ in pairs]):  # after the loss and gradients have read the weights
        decays = decay_update(params, model.lr_t, tf.constant(opt.weight_decay, model.dtype), opt.decay_times_lr)
    with tf.control_dependencies(decays):  # the update reads the decayed weights
        pairs = [(tf.identity(g), p) for g, p in pairs]
    what, op = _adam_op(model, opt, pairs, eps, conv)
    model.info["optimizer"] = (f"hand-written decay {'w -= lr * wd * w' if opt.decay_times_lr else 'w -= wd * w'} "
                               f"(TF1 has no AdamW), then {what}")
    return op


def _rmsprop(model, opt, pairs):
    dt = model.options.dtype
    rho, eps, inside, v0 = opt.rho, opt.epsilon, opt.epsilon_inside_sqrt, opt.initial_accumulator
    if model.native("rmsprop_rho"):
        rho = f32(TF1_RMSPROP_DECAY)
        model.note("rmsprop_rho", NATIVE_DEFAULTS["rmsprop_rho"],
                   value_diff("RMSprop rho", rho, opt.rho, dt, " (a Python float: a float32 tensor)", nominal=0.9))
    if model.native("rmsprop_epsilon"):
        eps, inside = f32(TF1_RMSPROP_EPSILON), True
        model.note("rmsprop_epsilon", NATIVE_DEFAULTS["rmsprop_epsilon"],
                   value_diff("RMSprop epsilon", eps, opt.epsilon, dt, nominal=TF1_RMSPROP_EPSILON),
                   None if opt.epsilon_inside_sqrt else "RMSprop epsilon inside the square root, sqrt(ms + eps) "
                                                        "(spec outside, sqrt(v) + eps)")
    if model.native("rmsprop_accumulator"):
        v0 = TF1_RMSPROP_INITIAL
        model.note("rmsprop_accumulator", NATIVE_DEFAULTS["rmsprop_accumulator"],
                   value_diff("RMSprop initial accumulator", v0, opt.initial_accumulator, dt))
    params = [p for _, p in pairs]
    if inside:
        o = v1.train.RMSPropOptimizer(learning_rate=model.lr_t, decay=model.hp(rho), momentum=model.hp(0.0),
                                      epsilon=model.hp(eps))
        op = o.apply_gradients(pairs)
        if v0 != TF1_RMSPROP_INITIAL:  # the spec's start instead of TF1's ones (public get_slot)
            model.post_init += [o.get_slot(p, "rms").assign(tf.fill(tf.shape(p), tf.constant(v0, model.dtype)))
                                for p in params]
        model.info["optimizer"] = (f"built-in tf.compat.v1.train.RMSPropOptimizer; RMSPropOptimizer(decay={fmt(rho)}, "
                                   f"momentum=0, epsilon={eps!r}), 'rms' slot from {fmt(v0)}; {model.hp_words()}")
        return op
    hp = hyper({"rho": rho, "epsilon": eps}, model.dtype)
    model.info["optimizer"] = ("hand-written RMSprop (eps outside the square root: sqrt(v) + eps); RMSPropOptimizer "
                               "has sqrt(ms + eps) only")
    return tf.group(*rmsprop_update(params, [g for g, _ in pairs], model.slots(params, v0, "rms"), model.lr_t,
                                    hp["rho"], hp["epsilon"], inside))


def _adagrad(model, opt, pairs):
    dt = model.options.dtype
    a0, eps, inside = opt.initial_accumulator, opt.epsilon, opt.epsilon_inside_sqrt
    if model.native("adagrad_accumulator"):
        a0 = TF1_ADAGRAD_INITIAL  # constant_initializer(0.1) in the variable's dtype
        model.note("adagrad_accumulator", NATIVE_DEFAULTS["adagrad_accumulator"],
                   value_diff("Adagrad initial accumulator", a0, opt.initial_accumulator, dt))
    if model.native("adagrad_epsilon"):
        eps = 0.0
        model.note("adagrad_epsilon", NATIVE_DEFAULTS["adagrad_epsilon"],
                   value_diff("Adagrad epsilon", eps, opt.epsilon, dt, " (AdagradOptimizer has none)"))
    params = [p for _, p in pairs]
    if eps == 0 and a0 > 0:  # AdagradOptimizer: no epsilon, and a positive initial accumulator only
        model.info["optimizer"] = (f"built-in tf.compat.v1.train.AdagradOptimizer; AdagradOptimizer("
                                   f"initial_accumulator_value={a0!r}), {model.hp_words()}")
        return v1.train.AdagradOptimizer(learning_rate=model.lr_t, initial_accumulator_value=a0).apply_gradients(pairs)
    model.info["optimizer"] = ("hand-written Adagrad (epsilon " + ("inside" if inside else "outside") + " the square "
                               "root); AdagradOptimizer has no epsilon")
    return tf.group(*adagrad_update(params, [g for g, _ in pairs], model.slots(params, a0, "accumulator"), model.lr_t,
                                    tf.constant(eps, model.dtype), inside))


OPTIMIZER_BUILDERS = {SGD: _sgd, Adam: _adam, AdamW: _adamw, RMSprop: _rmsprop, Adagrad: _adagrad}
TF1_OPTIMIZER_NAMES = {SGD: "GradientDescentOptimizer", Adam: "AdamOptimizer", AdamW: "AdamOptimizer",
                       RMSprop: "RMSPropOptimizer", Adagrad: "AdagradOptimizer"}


def _loss_notes(model) -> None:
    spec, dt = model.spec, model.options.dtype
    weights = spec.loss.class_weights
    if weights and spec.loss.reduction == "mean" and model.native("class_weight_denominator"):
        model.note("class_weight_denominator", NATIVE_DEFAULTS["class_weight_denominator"],
                   "class-weighted mean divided by the number of samples with a nonzero weight, "
                   "Reduction.SUM_BY_NONZERO_WEIGHTS (spec: the batch size)" if min(weights) == 0 else None,
                   "class-weighted loss reduced in float32 (compute_weighted_loss casts the losses and weights)"
                   if dt != "float32" else None)
    if spec.loss.l2 and model.native("l2_regularization"):
        model.note("l2_regularization", f"{fmt(spec.loss.l2)} * tf.nn.l2_loss(kernel) (sum(kernel**2) / 2)",
                   "L2 penalty l2 * tf.nn.l2_loss(kernel) = l2 * sum(kernel**2) / 2 (spec l2 * sum(kernel**2))")


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
        self.np_dtype = np.dtype(options.dtype)
        self.dtype = dtype = tf.as_dtype(self.np_dtype)
        self.updates = 0  # updates applied so far: the step whose dropout masks the next pass uses
        self.native_settings: dict[str, str] = {}
        self.native_diffs: list[str] = []
        self.post_init: list = []  # assign ops run once after the initializer (the optimizer's slots)
        self.info = {**environment_info(), "device": tf_device(options.device), "threads": options.threads,
                     "loss": {"sse": "sum of squares", "mse": "mean of squares over the last axis",
                              "sparse_categorical_crossentropy": "-log p[y] on the probabilities (tf.gather), "
                              "unclipped"}.get(spec.loss.kind, "tf.nn ops on logits (stable formula)"),
                     **set_tf32(options.device, self.native("matmul_precision"))}
        native_dropout = self.native("dropout_rng")
        shapes = spec.input_shapes()
        self.graph = tf.Graph()
        with self.graph.as_default(), tf.device(tf_device(options.device)):
            if native_dropout:
                v1.set_random_seed(options.seed)  # native dropout: TF's RNG, seeded by the run
            self.x = v1.placeholder(dtype, [None, *spec.input_shape], name="x")
            if spec.loss.integer_labels:
                self.y = v1.placeholder(tf.int64, [None], name="y")
            else:
                self.y = v1.placeholder(dtype, [None, *spec.output_shape], name="y")
            self.masks = [] if native_dropout else [v1.placeholder(dtype, [None, *shapes[i]], name=f"mask{i}")
                                                    for i in spec.random_layers]
            self.params = [v1.Variable(np.asarray(w, self.np_dtype), name=n.replace("/", "_"))
                           for w, n in zip(weights, spec.param_names())]
            self.state = [v1.Variable(np.asarray(s, self.np_dtype), name=n.replace("/", "_"), trainable=False)
                          for s, n in zip(init_state(spec), spec.state_names())]
            self.step = v1.Variable(np.int64(0), trainable=False, name="updates")  # the schedule's global step
            # the training pass: loss, gradients, and the state it moves
            ctx = Ctx(dtype, True, self.native, dict(zip(spec.random_layers, self.masks)), options.seed)
            out = forward(spec, self.params, self.x, ctx, self.state, LAYER_BUILDERS, BACKEND)
            self.loss = loss_fn(spec, out, self.y, self.params, self.native, LOSS_RULES)
            grads = v1.gradients(self.loss, self.params)
            with tf.control_dependencies([self.loss]):  # every update waits for the loss: it is the pre-update loss
                self.grads = [tf.identity(g) for g in grads]
            for var, value in zip(self.state, new_state(spec, ctx, self.state)):
                if value is not var:
                    v1.add_to_collection(v1.GraphKeys.UPDATE_OPS, var.assign(value, read_value=False))
            self.lr_t = schedule_lr(spec, self.step, dtype, self.native, tf1_schedule, tf.float32)
            pairs = list(zip(clip_grads(self.grads, spec.clip, self.native), self.params))
            apply_op = build_optimizer(self, spec.optimizer, pairs)
            with tf.control_dependencies([apply_op]):  # the counter moves after the update has read it
                count = self.step.assign_add(1, read_value=False)
            # the state moves with the update (grouped after the optimizer is built: its slot variables' initializers
            # must not depend on the update ops, hence on the fed batch)
            self.train_op = tf.group(apply_op, count, *v1.get_collection(v1.GraphKeys.UPDATE_OPS))
            # the inference pass over the same variables: moving statistics, no dropout
            out_inf = forward(spec, self.params, self.x, Ctx(dtype, False, self.native), self.state, LAYER_BUILDERS,
                              BACKEND)
            self.pred = predict_fn(spec, out_inf)
            init = v1.global_variables_initializer()
            post_init = tf.group(*self.post_init) if self.post_init else None
        self.graph.finalize()  # nothing is added per step
        self._notes()
        if self.state:
            native_bn = [k for k in BN_KEYS if self.native(k)]
            self.info["batchnorm"] = (
                "native: the graph of tf.compat.v1.layers.batch_normalization(training=...) with its defaults "
                "(momentum 0.99, epsilon 1e-3, fused=None: FusedBatchNormV3 for 4-D float32 input, storing the "
                "unbiased variance; tf.nn.moments otherwise), updates in UPDATE_OPS run with the train op"
                if len(native_bn) == len(BN_KEYS) else
                "tf.nn.moments + tf.nn.batch_normalization, spec momentum/epsilon as run-dtype tensors"
                + (f" (TF1's defaults for {', '.join(native_bn)})" if native_bn else "")
                + "; state in non-trainable variables assigned by UPDATE_OPS run with the train op")
        if spec.random_layers:
            self.info["dropout"] = ("native: tf.compat.v1.nn.dropout, TensorFlow's RNG" if native_dropout else
                                    "the harness's masks, fed through placeholders (None, ...)")
        if options.mode == "native":
            self.info["native_settings"] = dict(self.native_settings)
            self.info["native_differences"] = list(self.native_diffs)
        config = v1.ConfigProto()
        if options.threads:
            config.intra_op_parallelism_threads = options.threads
            config.inter_op_parallelism_threads = options.threads
        self.sess = v1.Session(graph=self.graph, config=config)
        self.sess.run(init)
        if post_init is not None:
            self.sess.run(post_init)

    def _notes(self) -> None:
        """What native mode changes against the spec, key by key (evaluated eagerly, outside the graph)."""
        layer_notes(self)
        _loss_notes(self)
        clip_notes(self)
        lr_notes(self, " (a Python float: a float32 tensor)", tf1_schedule,
                 "tf.compat.v1.train.exponential_decay({lr}, global_step, {every}, {factor}, staircase=True)",
                 tf.float32)
        if self.info.get("tf32") and self.options.dtype == "float32":
            self.note("matmul_precision", NATIVE_DEFAULTS["matmul_precision"],
                      "float32 matmuls / convolutions may use TF32 on the GPU (TF's default)")

    def bn_used(self, layer, shape):
        return tf1_bn_used(layer, shape, self.options.dtype)

    def lr_api(self) -> str:
        """Native ``lr_precision``: the TF1 optimizer a tutorial writes, with Python floats."""
        opt = self.spec.optimizer
        name = TF1_OPTIMIZER_NAMES[type(opt)]
        if name == "GradientDescentOptimizer" and opt.momentum > 0:
            name = "MomentumOptimizer"
        return f"tf.compat.v1.train.{name}(learning_rate={fmt(opt.lr)}, ...): Python floats become float32 tensors"

    # -- pieces the optimizer builders use -------------------------------------------------------------------------
    def hp(self, value: float):
        """A hyperparameter for a built-in optimizer: a tensor of the run's dtype, or with native ``lr_precision``
        the Python float a TF1 tutorial passes (TF1 makes it a float32 tensor and casts it per update)."""
        return float(value) if self.native("lr_precision") else tf.constant(value, self.dtype)

    def hp_words(self) -> str:
        return ("hyperparameters as Python floats (float32 tensors), the learning rate a float32 tensor"
                if self.native("lr_precision") else "hyperparameters as tensors of the run dtype")

    def slots(self, params, value: float, name: str):
        return [v1.Variable(np.full(p.shape, value, self.np_dtype), trainable=False, name=name) for p in params]

    # -- the contract -----------------------------------------------------------------------------------------------
    def _feed(self, x, y):
        y = np.asarray(y, np.int64 if self.spec.loss.integer_labels else self.np_dtype)
        x = np.asarray(x, self.np_dtype)
        feed = {self.x: x, self.y: y}
        if self.masks:  # this step's aligned dropout masks
            feed.update(zip(self.masks, self.dropout_masks(self.updates, len(x), self.np_dtype)))
        return feed

    def train_step(self, x, y):
        loss, _ = self.sess.run([self.loss, self.train_op], self._feed(x, y))
        self.updates += 1
        return float(loss)

    def gradients(self, x, y):
        loss, grads = self.sess.run([self.loss, self.grads], self._feed(x, y))
        return float(loss), [np.asarray(g) for g in grads]

    def predict(self, x):
        return self.sess.run(self.pred, {self.x: np.asarray(x, self.np_dtype)})

    def get_weights(self):
        return [np.array(w) for w in self.sess.run(self.params)]

    def get_state(self):
        return [np.array(s) for s in self.sess.run(self.state)]

    def gpu_peak_mb(self) -> float | None:
        """See :func:`backends.tf2_tape.gpu_peak_mb`: TF's process-wide GPU:0 allocator also serves this session."""
        return tf2_tape.gpu_peak_mb(self.options.device)

    def __del__(self):
        sess = getattr(self, "sess", None)
        if sess is not None:
            sess.close()
