"""Keras 3, high level: a functional model built from the spec, ``compile``, ``train_on_batch`` / ``fit``.

One module for the three Keras backends; ``KERAS_BACKEND`` (set by the registry in this subprocess's environment)
picks TensorFlow, JAX or torch, and ``keras.backend.backend()`` says which one this process runs.  Sources cited below
are files of the installed Keras 3.15.1 (``keras/src/...``).

Layers: every spec layer is looked up in ``LAYER_BUILDERS``, the optimizer in ``OPTIMIZER_BUILDERS``; a type missing
there raises ``Unsupported`` before anything is built.  Weights and state are bound by their spec role: a ``ParamSpec``
role (kernel, bias, gamma, beta, moving_mean, moving_variance) is the name of the Keras layer's attribute holding it.

Layouts: Keras 3 (channels_last) takes the canonical arrays as they are: Dense kernels ``(in, out)``, Conv2D kernels
HWIO, NHWC activations and ``Flatten`` in (h, w, c) order, on every Keras backend; the variables are assigned and read
unchanged (shapes are checked against the spec first).

Aligned mode, per item (built-in = Keras' own class configured with the spec's values):

* Dense / Conv2D: built-in, ``strides`` and ``padding`` as the spec's.  ``padding="same"`` is TF's rule on all three
  Keras backends (TF / XLA ``SAME``; on torch ``backend/torch/nn.py`` ``_compute_padding_length`` splits the total
  ``(total // 2, total - total // 2)`` and ``_apply_same_padding`` zero-pads when it is asymmetric) -- tested at
  stride 2 on odd and even inputs.  Activations are Keras' own (softmax over the last axis), except "tanh" in
  float64 on JAX: ``keras.ops.tanh`` computes in ``result_type(float64, float)`` = float32 there
  (``backend/jax/numpy.py`` ``tanh``; measured 1e-7 off), so :func:`tanh_in_dtype` (``expm1``) runs.
* MaxPool2D: built-in ``MaxPooling2D(pool_size, strides, "valid")``.
* AveragePooling2D: built-in ``AveragePooling2D(pool_size, strides, padding)`` on TensorFlow (``tf.nn.avg_pool``
  ``SAME`` divides by the in-image count) and JAX (``backend/jax/nn.py`` ``average_pool``: the window sum over a
  ``reduce_window`` of ones); on torch the built-in is the spec only where the "same" padding is symmetric
  (``avg_pool2d(count_include_pad=False)``): where it is asymmetric ``average_pool`` -> ``_apply_same_padding`` pads
  with ``mode="replicate"`` and averages the copied edge values too (measured: 0.23 off on a 6x6 input, pool 3, stride
  2), so :class:`SpecAveragePooling2D` (zero padding, ``ops.average_pool`` "valid", times p*p / in-image count) runs
  there.  ``info["avgpool"]`` says which.
* LayerNorm: built-in ``LayerNormalization(axis=-1, epsilon=spec)`` (``ops.layer_normalization``: biased variance,
  ``rsqrt(var + eps)``), except float64 on JAX where ``ops/nn.py`` ``_layer_normalization`` computes in
  ``result_type(float64, "float32")`` = float32: :class:`SpecLayerNorm`, the same formula in the input's dtype.
* Activation: Keras' own by name (tanh as above); ``leaky_relu``: ``LeakyReLU(negative_slope=spec)`` (on TF
  ``tf.nn.leaky_relu``'s alpha is a float32 attribute: the spec's slopes are float32-exact); ``gelu``:
  ``keras.activations.gelu(x, approximate=spec == "tanh")``, except float64 on TF: ``tf.nn.gelu`` writes
  ``math_ops.cast(0.7071067811865476, dtype)`` / ``cast(0.044715, dtype)``, and ``tf.cast`` of a Python float goes
  through float32, so its constants are float32-rounded (measured 5e-9 off): :func:`gelu_in_dtype` runs there.
  ``info["gelu"]`` / ``info["tanh"]`` say which.
* BatchNorm, Dropout: see below.
* Losses: the last layer stays linear for the spec's logit losses, which are Keras' own from logits --
  ``BinaryCrossentropy(from_logits=True)``, ``SparseCategoricalCrossentropy(from_logits=True)`` -- ``"sse"`` is
  :class:`SumSquaredError` (``MeanSquaredError`` would *mean* over the units), ``"mse"`` is ``MeanSquaredError``;
  reduction ``"sum"`` or ``"sum_over_batch_size"`` per the spec.  Where Keras means over the units with ``ops.mean``
  (BCE, MSE) and that computes in float32 (float64 on JAX: ``backend/jax/numpy.py`` ``mean``), the same loss with the
  mean written as sum / units runs (:class:`MeanOverUnits`).  ``"sparse_categorical_crossentropy"`` (on the softmax
  output, no clipping) is :class:`SparseCategoricalCrossentropyOnProbabilities`, ``-log(p[y])`` with ``ops.log``:
  Keras' own clips to ``[1e-7, 1 - 1e-7]`` (and on TF recovers the logits from the Softmax op).  Class weights are
  ``train_on_batch`` / ``fit``'s ``class_weight`` (per-sample weights ``w[y]``; ``sum_over_batch_size`` divides the
  weighted sum by N: ``losses/loss.py`` ``reduce_values``, the spec's); ``Loss.l2`` is ``kernel_regularizer=
  keras.regularizers.L2(l2)`` on every Dense / Conv2D kernel (``l2 * sum(w**2)``, added to the loss by
  ``Trainer.compute_loss``: the spec's).
* Optimizers: built-in ``SGD`` (no momentum, or momentum in the velocity form: ``optimizers/sgd.py`` ``update_step``
  is the spec's velocity form, Nesterov included), ``Adam``, ``AdamW`` (decay ``w -= w * wd * lr_t`` before the
  update: ``base_optimizer.py`` ``_apply_weight_decay``, called after clipping in ``_backend_apply_gradients``),
  ``RMSprop`` (``v0 = 0``, epsilon inside the square root), ``Adagrad`` (epsilon inside) with the spec's
  hyperparameters (floatx is the run's dtype, so the learning-rate variable is too).  Where the built-in cannot be
  configured to the spec, the built-in class with one method written out with ``keras.ops`` runs:
  :class:`SGDAccumulator` (the accumulator form: ``update_step``), :class:`RMSpropSpec` (epsilon outside the square
  root or a nonzero initial accumulator: ``build`` / ``update_step``), :class:`AdagradSpec` (epsilon outside:
  ``update_step``), :class:`AdamWDecayWithoutLR` (``decay_times_lr=False``: ``_apply_weight_decay``).
  ``info["optimizer"]`` says ``"built-in keras.optimizers.X; ..."`` or ``"hand-written <Class> ..."``.  Keras' Adam is
  the eps_hat form (``optimizers/adam.py``); a spec asking for ``eps_v_hat`` raises ``Unsupported``.  Keras casts some
  hyperparameters with ``ops.cast`` (SGD's momentum, Adam's betas, AdamW's weight decay, the Constant initializer of
  Adagrad's accumulator): on TF that rounds a Python float to float32 first (:func:`keras_cast`), harmless for the
  spec's float32-exact values, a difference for Keras' own defaults in float64 (below).
  Clipping: the optimizer's ``global_clipnorm`` (scope "global") or ``clipnorm`` (per variable: "per_tensor"), applied
  to the gradients before the update (``_clip_gradients``).  Schedule: ``keras.optimizers.schedules.ExponentialDecay(
  lr, every, factor, staircase=True)`` as the learning rate, evaluated at ``optimizer.iterations`` (0-based), with lr
  and factor given as NumPy scalars of the run's dtype (a Python float becomes a float32 tensor on TF, below).
* BatchNorm: ``keras.layers.BatchNormalization(momentum=spec.momentum, epsilon=spec.epsilon)``.  Its source
  (``layers/normalization/batch_normalization.py``, ``call``) is the spec's: batch mean and *biased* variance
  (``ops.moments``), ``moving = moving * momentum + batch_stat * (1.0 - momentum)`` (the oracle's order), the momentum a
  Python double (the spec's is float32-exact, and ``1 - momentum`` is then exact in float32 too).  Two cases it cannot
  be configured for use :class:`SpecBatchNorm`, the same layer with ``call`` written in the input's dtype: a spec with
  ``unbiased_moving_variance`` (Keras stores the biased variance), and float64 on JAX / torch, where the built-in
  computes in ``backend.result_type(dtype, "float32")`` -- float32 there (measured: 1e-7 off in float64).
  ``info["batchnorm"]`` says which ran.
* Dropout: the harness's masks (:meth:`ModelBase.dropout_masks`) enter the functional model as extra inputs, one per
  Dropout layer (``[x, mask_0, ...]``), and :class:`MaskDropout` multiplies by its mask in training and passes through
  in inference; ``train_on_batch`` / ``fit`` get step t's masks with step t's batch (one trace, masks are data).

Native mode is what a Keras user writes: the built-in layer / loss / optimizer with the spec's primary values (units,
lr, rate, momentum, max_norm, class weights, schedule) and Keras' defaults for the rest, one ``NATIVE_KEYS`` key at a
time (``ModelBase.native``; ``BuildOptions.extra["native_only"]`` applies only the listed keys).  Each builder forms
the *effective* values (the spec's, with Keras' default substituted for every active key) and runs the built-in where
it computes exactly those, else the hand-written class above with them.  Keras' defaults are read from a
default-constructed instance where they are attributes; per key (what differs goes to ``info["native_settings"]`` and
``info["native_differences"]``):

* ``loss_form``: sigmoid / softmax output layer with ``BinaryCrossentropy()`` / ``SparseCategoricalCrossentropy()`` on
  probabilities, ``MeanSquaredError()`` for "sse", reduction ``sum_over_batch_size`` (the default).  Keras on TF
  recovers the logits from the Sigmoid / Softmax op inside ``tf.function`` (``backend/tensorflow/nn.py``
  ``_get_logits``); on JAX / torch the probabilities are clipped to ``[1e-7, 1 - 1e-7]``.
* ``sparse_cce_probabilities``: ``SparseCategoricalCrossentropy()`` (``from_logits=False``) on the spec's softmax
  output: clipped on JAX / torch; on TF the logits path (the spec's value without clipping, rounded differently).
* ``class_weight_denominator``: none -- ``class_weight`` divides by N (``reduce_values``), the spec's (measured).
* ``l2_regularization``: none -- ``keras.regularizers.L2(l2)`` is ``l2 * sum(w**2)``, the spec's
  (``regularizers/regularizers.py`` ``L2.__call__``).
* ``conv_same_padding``: none (TF's rule on every backend, above).
* ``avgpool_count_pad``: on torch, where the "same" padding is asymmetric, the built-in's replicate padding (above);
  none on TF / JAX.
* ``layernorm_epsilon``: ``LayerNormalization()`` epsilon 1e-3 (a Python double; ``layer_normalization.py``).
* ``leaky_relu_slope``: ``keras.layers.LeakyReLU()``, negative_slope 0.3 (``layers/activations/leaky_relu.py``; f32(0.3)
  as applied on TF), the layer a Keras user writes for a leaky ReLU; ``Activation("leaky_relu")`` would give
  ``keras.activations.leaky_relu``'s 0.2 (``activations/activations.py``).
* ``gelu_approximation``: ``Activation("gelu")`` = ``keras.activations.gelu(approximate=False)``, the exact form
  (``keras.ops.gelu`` defaults to ``approximate=True``, ``ops/nn.py``; a user writing ``Activation(...)`` gets the
  exact one).
* ``batchnorm_momentum`` / ``batchnorm_epsilon`` / ``batchnorm_variance``: ``BatchNormalization()`` (0.99 and 1e-3 as
  Python doubles, the biased variance stored).
* ``dropout_rng``: ``Dropout(rate)`` with Keras' seed generator (on torch: torch's global RNG).
* ``adam_epsilon`` (1e-7 as a Python double), ``adam_convention`` (eps_hat), ``adam_one_minus_beta`` (beta_1 0.9,
  beta_2 0.999 as Python doubles: ``1 - beta`` is rounded from the double in float32): ``Adam`` / ``AdamW`` defaults.
* ``adamw_weight_decay``: ``AdamW()`` weight_decay 0.004 (``optimizers/adamw.py``; applied as f32(0.004) on TF, the
  spec's default, so it differs only on JAX); ``adamw_decay_form``: times lr.
* ``momentum_form``: ``SGD(momentum=mu, nesterov=...)`` is the velocity form.
* ``rmsprop_rho`` 0.9 / ``rmsprop_epsilon`` 1e-7 inside the square root / ``rmsprop_accumulator`` 0
  (``optimizers/rmsprop.py``); ``adagrad_accumulator`` 0.1 (applied as f32(0.1) on TF: the spec's default) /
  ``adagrad_epsilon`` 1e-7 inside (``optimizers/adagrad.py``).
* ``clip_scope``: ``clipnorm=max_norm`` (per variable: what a Keras user porting ``clip_grad_norm_`` writes);
  ``clip_epsilon``: none (neither ``clipnorm`` nor ``global_clipnorm`` adds one: ``base_optimizer.py``).
* ``lr_schedule``: ``ExponentialDecay(lr, every, factor, staircase=True)`` with Python floats: on TF its
  ``ops.convert_to_tensor(initial_learning_rate)`` is float32, so a float64 run's learning rate is float32-rounded
  (``optimizers/schedules/learning_rate_schedule.py``); none on JAX / torch.
* ``matmul_precision`` (Keras' own compute precision; there is no TF32 switch here, CPU runs): float64 on JAX, the
  built-in BatchNormalization / LayerNormalization, ``ops.tanh`` and the ``ops.mean`` of BCE / MSE compute in float32
  (``result_type(float64, "float32")``); float64 on TF, ``tf.nn.gelu``'s constants are float32-rounded.
``mse_broadcast`` does not apply (Keras' losses squeeze / expand an (N,) target to the output's rank).  Initial weights
are still the canonical ones.

Training: ``train_step`` and ``train_steps`` call ``train_on_batch``, which returns each step's own loss (the L2 penalty
included).  ``fit`` only logs a running mean per epoch, from which per-step losses come back only approximately -- not
within the harness's tolerances (see :meth:`Model.fit_epoch`); ``fit`` and a ``train_on_batch`` loop over the same
batches give bit-identical weights (tested).
Gradients (no update) use each backend's autodiff on the Keras model in training mode: ``tf.GradientTape`` inside a
``tf.function`` (tensorflow: so that the graph-only logits recovery of the native losses is what ``train_on_batch``
computes), ``model.stateless_call`` + ``jax.value_and_grad`` under ``jax.jit`` (jax), ``loss.backward()`` on zeroed
grads (torch); the
loss is the compiled loss with the class weights as sample weights plus the model's regularization losses; the
non-trainable variables (BatchNorm statistics, seed generators) are put back afterwards on tensorflow / torch (JAX's
stateless call discards them), so ``gradients`` moves nothing.

Quirks: float64 needs ``keras.config.set_floatx`` *and* ``set_dtype_policy`` before building.  Keras 3.15.1 on torch
is not float64 (its ``result_type(float64, float64)`` is float32, so a float64 ``Dense`` matmul rounds to float32):
such runs raise ``Unsupported``.  Keras on JAX is float64 only with ``JAX_ENABLE_X64`` set before JAX is imported.
On torch Keras swaps the built-in optimizers for ``backend/torch/optimizers`` versions (``torch._foreach_*`` updates,
AdamW's decay as ``w * (1 - wd * lr)``): the same formulas, rounded in another order (float32 only there).
"""

from __future__ import annotations

import functools
import math
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras import ops  # noqa: E402

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
    xla_peak_mb,
)

BACKEND = keras.backend.backend()
NAME = {"tensorflow": "keras", "jax": "keras-jax", "torch": "keras-torch"}.get(BACKEND, f"keras-{BACKEND}")

if BACKEND == "tensorflow":
    import tensorflow as tf
elif BACKEND == "jax":
    import jax
elif BACKEND == "torch":
    import torch

CAPABILITIES = Capabilities(
    dtypes=("float32",) if BACKEND == "torch" else ("float32", "float64"),
    devices=("cpu", "cuda"),
    notes=(f"Keras {keras.__version__} on {BACKEND}: train_on_batch, fit; built-in layers, losses and optimizers "
           f"where they compute the spec, their methods written out with keras.ops where not",),
)


def probe() -> str:
    return f"{keras.__version__} ({BACKEND} {_framework_version()})"


def _framework_version() -> str:
    if BACKEND == "tensorflow":
        return tf.__version__
    if BACKEND == "jax":
        return jax.__version__
    if BACKEND == "torch":
        return torch.__version__
    return "?"


def devices() -> list[str]:
    found = ["cpu"]
    try:
        if BACKEND == "tensorflow" and tf.config.list_physical_devices("GPU"):
            found.append("cuda")
        elif BACKEND == "jax" and any(d.platform == "gpu" for d in jax.devices()):
            found.append("cuda")
        elif BACKEND == "torch" and torch.cuda.is_available():
            found.append("cuda")
    except RuntimeError:
        pass
    return found


def torch_float64_problem() -> str | None:
    """Why Keras on torch cannot run float64, from what this Keras version does (None if it can)."""
    from keras.src.backend.common import dtypes

    rt = dtypes.result_type("float64", "float64")
    if rt == "float64":
        return None
    a = np.linspace(0.1, 1.3, 9).reshape(3, 3)
    with keras.device("cpu:0"):
        t = keras.ops.convert_to_tensor(a, dtype="float64")
        got = keras.ops.convert_to_numpy(keras.ops.matmul(t, t))
    err = float(np.max(np.abs(got.astype(np.float64) - a @ a)) / np.max(np.abs(a @ a)))
    return (f"Keras {keras.__version__} on torch computes matmuls in float32 (result_type(float64, float64) -> "
            f"{rt}; keras.ops.matmul of two float64 tensors returns {got.dtype}, relative error {err:.1e}): "
            f"a float64 row would be a float32 row in disguise")


def keras_cast(value: float, dtype: str) -> float:
    """A Python float as ``ops.cast(value, dtype)`` makes it, where Keras casts a hyperparameter that way (Constant
    initializers, ``_apply_weight_decay``, SGD's momentum, Adam's betas): on TF ``tf.cast`` converts the Python float
    to a float32 tensor first, so in float64 the value is float32-rounded (measured: ``ops.cast(0.9, "float64")`` is
    0.8999999761581421 on TF, 0.9 on JAX)."""
    return float(ops.convert_to_numpy(ops.cast(value, dtype)))


def demotes_float64() -> bool:
    """True when Keras' type promotion maps float64 to float32 (every Keras 3.15.1 backend but TensorFlow)."""
    return keras.backend.result_type("float64") != "float64"


def _set_threads(threads: int | None, info: dict) -> None:
    if not threads:
        return
    if BACKEND == "tensorflow":
        from .tf2_tape import set_threads

        set_threads(threads)
        info["threads"] = f"tf intra/inter op {threads}"
    elif BACKEND == "torch":
        torch.set_num_threads(threads)
        info["threads"] = f"torch.set_num_threads({threads})"
    else:  # XLA's CPU thread pool is fixed when JAX starts; the harness sets OMP_NUM_THREADS before that
        info["threads"] = f"jax: not settable after import (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')})"


# ------------------------------------------------------------------------------------------------------------ losses
class SumSquaredError(keras.losses.Loss):
    """The spec's "sse": per sample, the *sum* over output units of (out - y)^2 (Keras' MSE means over them)."""

    def call(self, y_true, y_pred):
        return ops.sum(ops.square(y_pred - y_true), axis=-1)


class MeanOverUnits(keras.losses.Loss):
    """A Keras loss that means over the output units (MSE, BCE) with that mean written as sum / units.

    Keras' own average with ``ops.mean``, which on JAX computes in ``result_type(dtype, "float32")`` -- float32 even
    for float64 input (``backend/jax/numpy.py`` ``mean``) -- so a float64 run would carry a float32 rounding (~1e-8).
    ``per_unit``: "squared_error", "bce_logits" (``ops.binary_crossentropy(from_logits=True)``) or "bce_probabilities"
    (``from_logits=False``: Keras' clipping to ``[epsilon, 1 - epsilon]``)."""

    def __init__(self, per_unit: str, **kwargs):
        super().__init__(**kwargs)
        self.per_unit = per_unit

    def call(self, y_true, y_pred):
        if self.per_unit == "squared_error":
            per_unit = ops.square(y_pred - y_true)
        else:
            per_unit = ops.binary_crossentropy(y_true, y_pred, from_logits=self.per_unit == "bce_logits")
        return ops.sum(per_unit, axis=-1) / per_unit.shape[-1]


class SparseCategoricalCrossentropyOnProbabilities(keras.losses.Loss):
    """The spec's "sparse_categorical_crossentropy": ``-log(p[label])`` on the softmax output, no clipping (Keras'
    ``SparseCategoricalCrossentropy()`` clips to ``[1e-7, 1 - 1e-7]`` on JAX / torch and recovers the logits on TF)."""

    def call(self, y_true, y_pred):
        labels = ops.reshape(ops.cast(y_true, "int32"), (-1, 1))
        return -ops.log(ops.reshape(ops.take_along_axis(y_pred, labels, axis=-1), (-1,)))


# ----------------------------------------------------------------------------------------------------- custom layers
def tanh_in_dtype(x):
    """tanh in ``x``'s dtype: ``keras.ops.tanh`` (and so the "tanh" activation) computes in ``result_type(dtype,
    float)``, float32 for float64 on JAX (``backend/jax/numpy.py`` ``tanh``; measured 1e-7 off).  Written as
    ``-expm1(-2|x|) / (2 + expm1(-2|x|))`` with the sign put back, the exponent never positive; the ``where`` on
    ``x >= 0`` (not ``abs``) keeps the derivative 1 at 0."""
    e = ops.expm1(ops.where(x >= 0, -2.0 * x, 2.0 * x))
    y = -e / (2.0 + e)
    return ops.where(x >= 0, y, -y)


def gelu_in_dtype(x, approximate: bool = False):
    """The spec's gelu with every constant in ``x``'s dtype: ``0.5 * x * (1 + erf(x / sqrt(2)))`` or ``0.5 * x * (1 +
    tanh(sqrt(2 / pi) * (x + 0.044715 * x**3)))``.  ``tf.nn.gelu`` (what Keras calls on TF) writes
    ``math_ops.cast(0.7071067811865476, dtype)`` / ``math_ops.cast(0.044715, dtype)``, and a Python float cast by
    ``tf.cast`` passes through float32 first: in float64 its constants are float32-rounded (measured: 5e-9 off, exact
    form; 9e-10, tanh form)."""

    def c(v):
        return ops.convert_to_tensor(v, dtype=x.dtype)

    if approximate:
        return c(0.5) * x * (c(1.0) + ops.tanh(c(math.sqrt(2.0 / math.pi)) * (x + c(0.044715) * (x * x * x))))
    return c(0.5) * x * (c(1.0) + ops.erf(x * c(1.0 / math.sqrt(2.0))))


class MaskDropout(keras.layers.Layer):
    """Aligned dropout: ``x * mask`` in training, ``x`` in inference; the mask is a model input (the harness's)."""

    def call(self, inputs, training=None):
        x, mask = inputs
        return x * ops.cast(mask, x.dtype) if training else x

    def compute_output_shape(self, input_shape):
        return input_shape[0]


class SpecBatchNorm(keras.layers.BatchNormalization):
    """``keras.layers.BatchNormalization`` (same variables, same formulas, same ``ops.moments`` /
    ``ops.batch_normalization``) with its arithmetic in the input's dtype, and optionally the unbiased batch variance
    (times n / (n - 1), n = values per feature in the batch) stored in ``moving_variance``: for the spec's cases the
    built-in cannot be configured for (float64 on JAX / torch: the built-in casts to ``result_type(dtype,
    float32)``)."""

    def __init__(self, unbiased_moving_variance: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.unbiased_moving_variance = unbiased_moving_variance

    def call(self, inputs, training=None, mask=None):
        dtype = inputs.dtype
        moving_mean = ops.cast(self.moving_mean, dtype)
        moving_variance = ops.cast(self.moving_variance, dtype)
        if training and self.trainable:
            axes = list(range(len(inputs.shape) - 1))
            mean, variance = ops.moments(inputs, axes)
            stored = variance
            if self.unbiased_moving_variance:
                n = ops.sum(ops.ones_like(inputs[..., 0]))  # values per feature; exact, and dynamic batch sizes work
                factor = ops.where(n > 1, n / ops.maximum(n - 1, 1), ops.ones_like(n))
                stored = variance * factor
            self.moving_mean.assign(moving_mean * self.momentum + mean * (1.0 - self.momentum))
            self.moving_variance.assign(moving_variance * self.momentum + stored * (1.0 - self.momentum))
        else:
            mean, variance = moving_mean, moving_variance
        return ops.batch_normalization(x=inputs, mean=mean, variance=variance, axis=self.axis,
                                       offset=ops.cast(self.beta, dtype), scale=ops.cast(self.gamma, dtype),
                                       epsilon=self.epsilon)


class SpecLayerNorm(keras.layers.LayerNormalization):
    """``keras.layers.LayerNormalization`` over the last axis with ``ops/nn.py`` ``_layer_normalization``'s formula
    (``inv = rsqrt(var + eps) * gamma``, ``x * inv + (beta - mean * inv)``, biased variance from ``ops.moments``) in the
    input's dtype: the built-in computes in ``result_type(dtype, "float32")``, float32 for float64 on JAX."""

    def call(self, inputs):
        dtype = inputs.dtype
        mean, variance = ops.moments(inputs, axes=[-1], keepdims=True)
        inv = ops.rsqrt(variance + self.epsilon) * ops.cast(self.gamma, dtype)
        return inputs * inv + (ops.cast(self.beta, dtype) - mean * inv)


class SpecAveragePooling2D(keras.layers.Layer):
    """The spec's average pooling with explicit ((top, bottom), (left, right)) zero padding: ``ops.average_pool``
    "valid" over the padded input (window sum / p*p) times p*p / (the window's in-image count), so padded zeros are
    neither averaged nor counted.  For Keras on torch, whose built-in pads an asymmetric "same" by replicating edges."""

    def __init__(self, pool_size: int, strides: int, pads, **kwargs):
        super().__init__(**kwargs)
        self.pool_size, self.strides, self.pads = int(pool_size), int(strides), tuple(tuple(p) for p in pads)

    def build(self, input_shape):
        p, s = self.pool_size, self.strides
        counts = []
        for size, (lo, hi) in zip(input_shape[1:3], self.pads):
            inside = np.pad(np.ones(size), (lo, hi))
            counts.append(np.array([inside[k * s:k * s + p].sum() for k in range((size + lo + hi - p) // s + 1)]))
        self._scale = (p * p) / np.multiply.outer(counts[0], counts[1])[None, :, :, None]

    def call(self, inputs):
        (t, b), (left, r) = self.pads
        padded = ops.pad(inputs, [[0, 0], [t, b], [left, r], [0, 0]])
        pooled = ops.average_pool(padded, self.pool_size, self.strides, padding="valid", data_format="channels_last")
        return pooled * ops.cast(self._scale, inputs.dtype)

    def compute_output_shape(self, input_shape):
        p, s = self.pool_size, self.strides
        hw = [None if n is None else (n + lo + hi - p) // s + 1 for n, (lo, hi) in zip(input_shape[1:3], self.pads)]
        return (input_shape[0], *hw, input_shape[3])


# ------------------------------------------------------------------------------------ optimizers written with keras.ops
class SGDAccumulator(keras.optimizers.SGD):
    """``keras.optimizers.SGD`` with ``update_step`` in the spec's accumulator form (torch / TF1 / optax): ``b = mu * b
    + g``; ``w -= lr_t * b``, Nesterov ``w -= lr_t * (g + mu * b)`` (Keras' own is the velocity form, which parts from
    this one once the learning rate changes)."""

    def update_step(self, gradient, variable, learning_rate):
        lr = ops.cast(learning_rate, variable.dtype)
        g = ops.cast(gradient, variable.dtype)
        mu = ops.cast(self.momentum, variable.dtype)
        b = self.momentums[self._get_variable_index(variable)]
        new_b = ops.add(ops.multiply(mu, b), g)
        self.assign(b, new_b)
        step = ops.add(g, ops.multiply(mu, new_b)) if self.nesterov else new_b
        self.assign_sub(variable, ops.multiply(lr, step))


class RMSpropSpec(keras.optimizers.RMSprop):
    """``keras.optimizers.RMSprop`` (rho, epsilon, no momentum, not centered) with the accumulator starting at
    ``initial_accumulator`` (``build``; Keras' starts at 0) and epsilon inside or outside the square root
    (``update_step``: ``lr * g / sqrt(v + eps)`` or ``lr * g / (sqrt(v) + eps)``; Keras' is inside)."""

    def __init__(self, initial_accumulator: float = 0.0, epsilon_inside_sqrt: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.initial_accumulator, self.epsilon_inside_sqrt = initial_accumulator, epsilon_inside_sqrt

    def build(self, var_list):
        if self.built:
            return
        keras.optimizers.Optimizer.build(self, var_list)
        self._velocities = self.add_optimizer_variables(
            var_list, "velocity", initializer=keras.initializers.Constant(self.initial_accumulator))
        self._momentums, self._average_gradients = [], []

    def update_step(self, gradient, variable, learning_rate):
        lr = ops.cast(learning_rate, variable.dtype)
        g = ops.cast(gradient, variable.dtype)
        v = self._velocities[self._get_variable_index(variable)]
        new_v = ops.add(ops.multiply(self.rho, v), ops.multiply(1 - self.rho, ops.square(g)))
        self.assign(v, new_v)
        eps = self.epsilon  # a Python float, as Keras adds it (ops.cast of a Python float is float32-rounded on TF)
        denominator = ops.sqrt(ops.add(new_v, eps)) if self.epsilon_inside_sqrt else ops.add(ops.sqrt(new_v), eps)
        self.assign_sub(variable, ops.divide(ops.multiply(lr, g), denominator))


class AdagradSpec(keras.optimizers.Adagrad):
    """``keras.optimizers.Adagrad`` with epsilon outside the square root (``update_step``: ``lr * g / (sqrt(a) + eps)``,
    torch's placement; Keras' is ``sqrt(a + eps)``)."""

    def update_step(self, gradient, variable, learning_rate):
        lr = ops.cast(learning_rate, variable.dtype)
        g = ops.cast(gradient, variable.dtype)
        a = self._accumulators[self._get_variable_index(variable)]
        new_a = ops.add(a, ops.square(g))
        self.assign(a, new_a)
        self.assign_sub(variable, ops.divide(ops.multiply(lr, g), ops.add(ops.sqrt(new_a), self.epsilon)))


class AdamWDecayWithoutLR(keras.optimizers.AdamW):
    """``keras.optimizers.AdamW`` with the decay ``w -= wd * w`` (``_apply_weight_decay``; Keras' multiplies it by the
    learning rate): the spec's ``decay_times_lr=False``.  Still after clipping and before the Adam update."""

    def _apply_weight_decay(self, variables):
        for variable in variables:
            if self._use_weight_decay(variable):
                wd = ops.cast(self.weight_decay, variable.dtype)
                variable.assign(variable - variable * wd)


# ------------------------------------------------------------------------------------------------------ the tables
# A layer builder: (model, layer, index, keras tensor in) -> (keras tensor out, the Keras layer holding its variables
# or None).  An optimizer builder: (model, optimizer spec) -> the Keras optimizer.  ``m.note(key, setting, diff)``
# records a native key that changed this run.
def _kernel_kw(m) -> dict:
    """``kernel_regularizer=L2(l2)`` for the spec's L2 penalty: Keras' own is the spec's (``l2 * sum(w**2)``), so
    aligned and native (``l2_regularization``) build the same."""
    return {"kernel_regularizer": keras.regularizers.L2(m.spec.loss.l2)} if m.spec.loss.l2 else {}


def _act(m, name: str):
    """The activation argument for Keras: its name, or :func:`tanh_in_dtype` for "tanh" where Keras' computes in
    float32 (float64 on JAX), unless native ``matmul_precision`` keeps Keras' own."""
    if name != "tanh" or _computes_float32(m, "tanh"):
        return name
    m.used["tanh"].add(f"tanh_in_dtype (keras.ops.tanh computes in float32 for float64 on {BACKEND})")
    return tanh_in_dtype


def _dense(m, layer, i, h):
    k = keras.layers.Dense(layer.units, activation=_act(m, layer.activation), use_bias=layer.use_bias,
                           **_kernel_kw(m))
    return k(h), k


def _conv(m, layer, i, h):
    """Keras' Conv2D; its "same" is TF's rule on every Keras backend, so ``conv_same_padding`` changes nothing."""
    k = keras.layers.Conv2D(layer.filters, tuple(layer.kernel_size), strides=tuple(layer.strides),
                            activation=_act(m, layer.activation), padding=layer.padding, use_bias=layer.use_bias,
                            data_format="channels_last", **_kernel_kw(m))
    return k(h), k


def _pool(m, layer, i, h):
    return keras.layers.MaxPooling2D(pool_size=layer.pool_size, strides=layer.stride, padding="valid",
                                     data_format="channels_last")(h), None


def _avgpool(m, layer, i, h):
    """Built-in ``AveragePooling2D`` except Keras on torch with an asymmetric "same" padding (replicated edges, see the
    module docstring): :class:`SpecAveragePooling2D` there in aligned mode, the built-in and a note in native."""
    pads = layer.pads(tuple(h.shape[1:]))
    replicates = BACKEND == "torch" and layer.padding == "same" and any(a != b for a, b in pads)
    builtin = keras.layers.AveragePooling2D(pool_size=layer.pool_size, strides=layer.stride, padding=layer.padding,
                                            data_format="channels_last")
    if not replicates:
        m.used["avgpool"].add(f"built-in keras.layers.AveragePooling2D(padding={layer.padding!r})")
        return builtin(h), None
    if m.native("avgpool_count_pad"):
        m.note("avgpool_count_pad", "keras.layers.AveragePooling2D(padding='same') on torch: an asymmetric padding "
                                    "replicates the edge rows / columns (keras/src/backend/torch/nn.py "
                                    "_apply_same_padding, mode='replicate') and averages them",
               f"AveragePooling2D layer {i}: Keras on torch pads the asymmetric 'same' padding {pads} by replicating "
               f"edge values and averages over them (spec: the in-image values only)")
        m.used["avgpool"].add("built-in keras.layers.AveragePooling2D(padding='same'): replicated edges on torch")
        return builtin(h), None
    m.used["avgpool"].add("SpecAveragePooling2D (zero padding, in-image count) for an asymmetric 'same' padding on "
                          "torch (the built-in replicates edges)")
    return SpecAveragePooling2D(layer.pool_size, layer.stride, pads)(h), None


def _flatten(m, layer, i, h):
    return keras.layers.Flatten(data_format="channels_last")(h), None


def _leaky_relu(m, layer, i):
    if m.native("leaky_relu_slope"):
        k = keras.layers.LeakyReLU()  # keras/src/layers/activations/leaky_relu.py: negative_slope=0.3
        probe = ops.convert_to_tensor(np.array([-1.0], m.options.dtype))
        used = -float(ops.convert_to_numpy(k(probe))[0])  # TF: tf.nn.leaky_relu's alpha is a float32 attribute
        d = value_diff("leaky_relu negative_slope", used, layer.negative_slope, m.options.dtype,
                       " (keras.layers.LeakyReLU(); Activation('leaky_relu') would use keras.activations.leaky_relu's "
                       "0.2)", nominal=k.negative_slope)
        if d:
            m.note("leaky_relu_slope", f"keras.layers.LeakyReLU(negative_slope={k.negative_slope!r})", d)
        return k
    return keras.layers.LeakyReLU(negative_slope=layer.negative_slope)


def _gelu(m, layer, i):
    """``keras.activations.gelu``; on TF in float64 :func:`gelu_in_dtype` (tf.nn.gelu's float32-rounded constants),
    unless native ``matmul_precision`` keeps Keras' own."""
    approximate = layer.approximate == "tanh"
    if m.native("gelu_approximation") and approximate:  # keras.activations.gelu(x, approximate=False): exact
        approximate = False
        m.note("gelu_approximation", "keras.layers.Activation('gelu') = keras.activations.gelu(approximate=False)",
               "gelu: Activation('gelu') is keras.activations.gelu, exact (erf) by default (spec: tanh "
               "approximation)")
    if BACKEND == "tensorflow" and m.options.dtype == "float64" and not m.precision_default(
            "gelu computes with float32-rounded constants on tensorflow (tf.nn.gelu casts its Python float constants "
            "through float32)", "tf.nn.gelu with float32-rounded constants"):
        m.used["gelu"].add("gelu_in_dtype (tf.nn.gelu's constants are float32-rounded in float64)")
        return keras.layers.Activation(functools.partial(gelu_in_dtype, approximate=approximate))
    m.used["gelu"].add(f"keras.activations.gelu(approximate={approximate})")
    if not approximate:
        return keras.layers.Activation("gelu")  # what a Keras user writes
    return keras.layers.Activation(functools.partial(keras.activations.gelu, approximate=True))


ACTIVATION_BUILDERS = {"leaky_relu": _leaky_relu, "gelu": _gelu}  # the rest: keras.layers.Activation(name)


def _activation(m, layer, i, h):
    build = ACTIVATION_BUILDERS.get(layer.activation)
    k = build(m, layer, i) if build else keras.layers.Activation(_act(m, layer.activation))
    return k(h), None


def _computes_float32(m, what: str) -> bool:
    """True when Keras' built-in ``what`` may run: False where, in float64 on JAX, it computes in float32
    (``result_type(float64, "float32")``) and native ``matmul_precision`` does not keep that (see
    :meth:`Model.precision_default`)."""
    if not (m.options.dtype == "float64" and demotes_float64()):
        return True
    return m.precision_default(f"{what} computes in float32 on {BACKEND} (Keras casts to result_type(float64, "
                               f"float32) -> float32)", f"{what} in float32")


def _batchnorm(m, layer, i, h):
    dt = m.options.dtype
    default = keras.layers.BatchNormalization()  # batch_normalization.py: momentum=0.99, epsilon=1e-3, biased variance
    momentum, epsilon, unbiased = layer.momentum, layer.epsilon, layer.unbiased_moving_variance
    if m.native("batchnorm_momentum"):
        momentum = default.momentum
        d = value_diff("BatchNorm momentum", momentum, layer.momentum, dt, " (a Python double)")
        if dt == "float32" and np.float32(1.0 - momentum) != np.float32(1.0) - np.float32(layer.momentum):
            d = (f"1 - BatchNorm momentum from the Python double {momentum!r}: {np.float32(1.0 - momentum):.9g} "
                 f"(spec, in float32: {np.float32(1.0) - np.float32(layer.momentum):.9g})")
        if d:
            m.note("batchnorm_momentum", f"keras.layers.BatchNormalization(momentum={momentum!r})", d)
    if m.native("batchnorm_epsilon"):
        epsilon = default.epsilon
        d = value_diff("BatchNorm epsilon", epsilon, layer.epsilon, dt, " (a Python double)")
        if d:
            m.note("batchnorm_epsilon", f"keras.layers.BatchNormalization(epsilon={epsilon!r})", d)
    if m.native("batchnorm_variance") and unbiased:
        unbiased = False
        m.note("batchnorm_variance", "keras.layers.BatchNormalization stores the biased batch variance",
               "BatchNorm stores the batch's biased variance in moving_variance (spec: unbiased, n/(n-1))")
    kw = dict(momentum=momentum, epsilon=epsilon)
    reasons = ["unbiased moving variance (the built-in stores the biased one)"] if unbiased else []
    if not _computes_float32(m, "BatchNorm"):
        reasons.append(f"float64 (the built-in computes in result_type(float64, float32) = float32 on {BACKEND})")
    if reasons:
        k = SpecBatchNorm(unbiased_moving_variance=unbiased, **kw)
        m.used["batchnorm"].add(f"SpecBatchNorm (BatchNormalization's call in the input's dtype) for "
                                f"{' and '.join(reasons)}")
    else:
        k = keras.layers.BatchNormalization(**kw)
        m.used["batchnorm"].add("built-in keras.layers.BatchNormalization(momentum=" + ("default" if momentum ==
                                default.momentum else "spec") + ", epsilon=" + ("default" if epsilon ==
                                default.epsilon else "spec") + ")")
    return k(h), k


def _layernorm(m, layer, i, h):
    epsilon = layer.epsilon
    if m.native("layernorm_epsilon"):
        epsilon = keras.layers.LayerNormalization().epsilon  # layer_normalization.py: epsilon=1e-3
        d = value_diff("LayerNorm epsilon", epsilon, layer.epsilon, m.options.dtype, " (a Python double)")
        if d:
            m.note("layernorm_epsilon", f"keras.layers.LayerNormalization(epsilon={epsilon!r})", d)
    if _computes_float32(m, "LayerNorm"):
        k = keras.layers.LayerNormalization(axis=-1, epsilon=epsilon)
        m.used["layernorm"].add("built-in keras.layers.LayerNormalization(axis=-1)")
    else:
        k = SpecLayerNorm(axis=-1, epsilon=epsilon)
        m.used["layernorm"].add(f"SpecLayerNorm (its formula in the input's dtype) for float64 (the built-in computes "
                                f"in float32 on {BACKEND})")
    return k(h), k


def _dropout(m, layer, i, h):
    if m.native("dropout_rng"):
        d = ("Dropout masks from torch's global RNG (Keras' unseeded Dropout on torch calls "
             "torch.nn.functional.dropout): trajectories not comparable" if BACKEND == "torch" else
             "Dropout masks from Keras' RNG (seed generator): trajectories not comparable")
        m.note("dropout_rng", f"keras.layers.Dropout({layer.rate})", d)
        return keras.layers.Dropout(layer.rate)(h), None
    mask = keras.Input(shape=tuple(h.shape[1:]), name=f"dropout{i}_mask")
    m.mask_inputs.append(mask)
    return MaskDropout()([h, mask]), None


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


def _describe(cls, **kw) -> str:
    return f"{cls.__name__}(" + ", ".join(f"{k}={fmt(v) if isinstance(v, float) else repr(v)}"
                                          for k, v in kw.items()) + ")"


def _sgd(m, opt):
    form = opt.momentum_form
    if opt.momentum and form != "velocity" and m.native("momentum_form"):
        form = "velocity"
        m.note("momentum_form",
               f"keras.optimizers.SGD(momentum={fmt(opt.momentum)}, nesterov={opt.nesterov}): velocity form "
               f"v = mu*v - lr*g; w += v",
               "SGD momentum: Keras' velocity form v = mu*v - lr_t*g; w += v (spec: accumulator b = mu*b + g; "
               "w -= lr_t*b): they part once the learning rate changes")
    kw = dict(momentum=float(opt.momentum), nesterov=bool(opt.nesterov))
    if not opt.momentum or form == "velocity":
        m.set_optimizer("built-in keras.optimizers.SGD", _describe(keras.optimizers.SGD, learning_rate=opt.lr, **kw))
        return keras.optimizers.SGD(learning_rate=m.lr, **kw, **m.clip_kw)
    m.set_optimizer("hand-written SGDAccumulator (keras.optimizers.SGD, update_step in the accumulator form)",
                    _describe(SGDAccumulator, learning_rate=opt.lr, **kw))
    return SGDAccumulator(learning_rate=m.lr, **kw, **m.clip_kw)


def _adam_values(m, opt, cls) -> tuple[float, float, float]:
    """(beta_1, beta_2, epsilon) of the run: the spec's, or ``cls``'s defaults for the active Adam keys; raises
    Unsupported for the eps_v_hat convention unless ``adam_convention`` substitutes Keras' eps_hat."""
    dt, default = m.options.dtype, cls()
    b1, b2, eps = opt.beta1, opt.beta2, opt.epsilon
    name = cls.__name__
    if m.native("adam_epsilon"):
        eps = default.epsilon
        d = value_diff(f"{name} epsilon", float(eps), opt.epsilon, dt)
        if d:
            m.note("adam_epsilon", f"keras.optimizers.{name}(epsilon={eps!r})", d)
    if m.native("adam_one_minus_beta"):
        b1, b2 = default.beta_1, default.beta_2
        ds = [d for d in (value_diff(f"{name} beta_1", float(b1), opt.beta1, dt, " (a Python double)"),
                          value_diff(f"{name} beta_2", float(b2), opt.beta2, dt, " (a Python double)")) if d]
        ds += one_minus_beta_diffs({"beta_1": b1, "beta_2": b2}, opt, dt)
        if ds:
            m.note("adam_one_minus_beta", f"keras.optimizers.{name}(beta_1={b1!r}, beta_2={b2!r}) (Python doubles; "
                                          f"1 - beta rounded from the double)", *ds)
    if opt.convention != "eps_hat":
        if not m.native("adam_convention"):
            raise Unsupported(f"Keras' {name} has the eps_hat convention only (a constant epsilon added to sqrt(v)); "
                              f"the spec's {opt.convention} would need epsilon*sqrt(1-beta_2^t), a new value every "
                              f"step, and Keras bakes its epsilon into the compiled train function")
        m.note("adam_convention", f"keras.optimizers.{name}: eps_hat (epsilon added to sqrt(v))",
               f"{name} epsilon convention eps_hat (spec {opt.convention})")
    return b1, b2, eps


def _adam(m, opt):
    b1, b2, eps = _adam_values(m, opt, keras.optimizers.Adam)
    kw = dict(beta_1=b1, beta_2=b2, epsilon=eps)
    m.set_optimizer("built-in keras.optimizers.Adam", _describe(keras.optimizers.Adam, learning_rate=opt.lr, **kw))
    return keras.optimizers.Adam(learning_rate=m.lr, **kw, **m.clip_kw)


def _adamw(m, opt):
    b1, b2, eps = _adam_values(m, opt, keras.optimizers.AdamW)
    wd, times_lr = opt.weight_decay, opt.decay_times_lr
    if m.native("adamw_weight_decay"):
        wd = keras.optimizers.AdamW().weight_decay  # optimizers/adamw.py: weight_decay=0.004
        used = keras_cast(wd, m.options.dtype)  # _apply_weight_decay: ops.cast(self.weight_decay, variable.dtype)
        d = value_diff("AdamW weight_decay", used, opt.weight_decay, m.options.dtype, nominal=wd)
        if d:
            m.note("adamw_weight_decay", f"keras.optimizers.AdamW(weight_decay={wd!r})", d)
    if m.native("adamw_decay_form") and not times_lr:
        times_lr = True  # base_optimizer.py _apply_weight_decay: variable - variable * wd * lr
        m.note("adamw_decay_form", "keras.optimizers.AdamW: w -= w * weight_decay * lr",
               "AdamW decay multiplied by the learning rate (spec: w -= weight_decay * w)")
    kw = dict(beta_1=b1, beta_2=b2, epsilon=eps, weight_decay=wd)
    if times_lr:
        m.set_optimizer("built-in keras.optimizers.AdamW", _describe(keras.optimizers.AdamW, learning_rate=opt.lr,
                                                                     **kw))
        return keras.optimizers.AdamW(learning_rate=m.lr, **kw, **m.clip_kw)
    m.set_optimizer("hand-written AdamWDecayWithoutLR (keras.optimizers.AdamW, _apply_weight_decay without lr)",
                    _describe(AdamWDecayWithoutLR, learning_rate=opt.lr, **kw))
    return AdamWDecayWithoutLR(learning_rate=m.lr, **kw, **m.clip_kw)


def _one_minus_diff(what: str, used: float, spec_value: float, dtype: str) -> str | None:
    """Keras computes ``1 - rho`` from the Python double, then casts: in float32 that can differ from the spec's."""
    if dtype != "float32":
        return None
    a, b = np.float32(1.0 - float(used)), np.float32(1.0) - np.float32(spec_value)
    return None if a == b else f"1 - {what} from the Python double {used!r}: {a:.9g} (spec, in float32: {b:.9g})"


def _rmsprop(m, opt):
    dt, default = m.options.dtype, keras.optimizers.RMSprop()  # optimizers/rmsprop.py: rho=0.9, epsilon=1e-7
    rho, eps, inside, v0 = opt.rho, opt.epsilon, opt.epsilon_inside_sqrt, opt.initial_accumulator
    if m.native("rmsprop_rho"):
        rho = default.rho
        d = value_diff("RMSprop rho", rho, opt.rho, dt, " (a Python double)") or _one_minus_diff(
            "RMSprop rho", rho, opt.rho, dt)
        if d:
            m.note("rmsprop_rho", f"keras.optimizers.RMSprop(rho={rho!r})", d)
    if m.native("rmsprop_epsilon"):
        eps, inside = default.epsilon, True  # update_step: lr * g / sqrt(v + epsilon)
        d = value_diff("RMSprop epsilon", eps, opt.epsilon, dt)
        if d or not opt.epsilon_inside_sqrt:
            m.note("rmsprop_epsilon", f"keras.optimizers.RMSprop(epsilon={eps!r}): inside the square root",
                   (d or f"RMSprop epsilon {fmt(eps)}") + ("; inside the square root (spec: outside)"
                                                           if not opt.epsilon_inside_sqrt else ""))
    if m.native("rmsprop_accumulator") and v0 != 0.0:
        v0 = 0.0  # build: add_optimizer_variables(var_list, "velocity"), zeros
        m.note("rmsprop_accumulator", "keras.optimizers.RMSprop: accumulator starts at 0",
               f"RMSprop accumulator starts at 0 (spec {fmt(opt.initial_accumulator)})")
    kw = dict(rho=rho, epsilon=eps)
    if inside and v0 == 0.0:
        m.set_optimizer("built-in keras.optimizers.RMSprop", _describe(keras.optimizers.RMSprop, learning_rate=opt.lr,
                                                                       **kw))
        return keras.optimizers.RMSprop(learning_rate=m.lr, **kw, **m.clip_kw)
    kw.update(initial_accumulator=v0, epsilon_inside_sqrt=inside)
    m.set_optimizer("hand-written RMSpropSpec (keras.optimizers.RMSprop, build / update_step with the initial "
                    "accumulator and epsilon placement)", _describe(RMSpropSpec, learning_rate=opt.lr, **kw))
    return RMSpropSpec(learning_rate=m.lr, **kw, **m.clip_kw)


def _adagrad(m, opt):
    dt, default = m.options.dtype, keras.optimizers.Adagrad()  # optimizers/adagrad.py: 0.1, epsilon=1e-7 inside
    a0, eps, inside = opt.initial_accumulator, opt.epsilon, opt.epsilon_inside_sqrt
    if m.native("adagrad_accumulator"):
        a0 = default.initial_accumulator_value
        used = keras_cast(a0, dt)  # build: initializers.Constant(a0), which is ops.cast(a0, dtype) * ones
        d = value_diff("Adagrad initial accumulator", used, opt.initial_accumulator, dt, nominal=a0)
        if d:
            m.note("adagrad_accumulator", f"keras.optimizers.Adagrad(initial_accumulator_value={a0!r})", d)
    if m.native("adagrad_epsilon"):
        eps, inside = default.epsilon, True
        d = value_diff("Adagrad epsilon", eps, opt.epsilon, dt)
        if d or not opt.epsilon_inside_sqrt:
            m.note("adagrad_epsilon", f"keras.optimizers.Adagrad(epsilon={eps!r}): inside the square root",
                   (d or f"Adagrad epsilon {fmt(eps)}") + ("; inside the square root (spec: outside)"
                                                           if not opt.epsilon_inside_sqrt else ""))
    kw = dict(initial_accumulator_value=a0, epsilon=eps)
    if inside:
        m.set_optimizer("built-in keras.optimizers.Adagrad", _describe(keras.optimizers.Adagrad, learning_rate=opt.lr,
                                                                       **kw))
        return keras.optimizers.Adagrad(learning_rate=m.lr, **kw, **m.clip_kw)
    m.set_optimizer("hand-written AdagradSpec (keras.optimizers.Adagrad, update_step with epsilon outside the square "
                    "root)", _describe(AdagradSpec, learning_rate=opt.lr, **kw))
    return AdagradSpec(learning_rate=m.lr, **kw, **m.clip_kw)


OPTIMIZER_BUILDERS = {SGD: _sgd, Adam: _adam, AdamW: _adamw, RMSprop: _rmsprop, Adagrad: _adagrad}


# ------------------------------------------------------------------------------------------------------------ losses
# The loss builders by the effective loss kind: (model, Keras reduction) -> keras.losses.Loss, setting info["loss"].
def _loss_sse(m, reduction):
    m.info["loss"] = f"SumSquaredError (sum over units) reduction={reduction!r}"
    return SumSquaredError(reduction=reduction)


def _mean_over_units(m, reduction, builtin, per_unit, text):
    if _computes_float32(m, "the loss's mean over output units"):
        m.info["loss"] = f"{text} reduction={reduction!r}"
        return builtin(reduction=reduction)
    m.info["loss"] = (f"MeanOverUnits({per_unit!r}) (sum / units) reduction={reduction!r}: Keras' own means with "
                      f"ops.mean, which computes in float32 on {BACKEND} (result_type(float64) -> float32)")
    return MeanOverUnits(per_unit, reduction=reduction)


def _loss_mse(m, reduction):
    return _mean_over_units(m, reduction, keras.losses.MeanSquaredError, "squared_error",
                            "keras.losses.MeanSquaredError()")


def _loss_bce_logits(m, reduction):
    return _mean_over_units(m, reduction, functools.partial(keras.losses.BinaryCrossentropy, from_logits=True),
                            "bce_logits", "keras.losses.BinaryCrossentropy(from_logits=True)")


def _loss_bce_probabilities(m, reduction):
    return _mean_over_units(m, reduction, keras.losses.BinaryCrossentropy, "bce_probabilities",
                            "keras.losses.BinaryCrossentropy()")


def _loss_cce_logits(m, reduction):
    m.info["loss"] = f"keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction={reduction!r})"
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=reduction)


def _loss_cce_probabilities(m, reduction):
    m.info["loss"] = f"keras.losses.SparseCategoricalCrossentropy() reduction={reduction!r}"
    return keras.losses.SparseCategoricalCrossentropy(reduction=reduction)


def _loss_sparse_cce(m, reduction):
    m.info["loss"] = f"SparseCategoricalCrossentropyOnProbabilities (-log p[y], ops.log) reduction={reduction!r}"
    return SparseCategoricalCrossentropyOnProbabilities(reduction=reduction)


LOSS_BUILDERS = {
    "sse": _loss_sse,
    "mse": _loss_mse,
    "binary_crossentropy": _loss_bce_logits,
    "softmax_crossentropy": _loss_cce_logits,
    "sparse_categorical_crossentropy": _loss_sparse_cce,
    "bce_probabilities": _loss_bce_probabilities,  # native loss_form
    "cce_probabilities": _loss_cce_probabilities,  # native loss_form / sparse_cce_probabilities
}
# native loss_form: the spec's loss -> (what a Keras user writes, the output layer's activation or None)
LOSS_FORMS = {"sse": ("mse", None, "keras.losses.MeanSquaredError()"),
              "binary_crossentropy": ("bce_probabilities", "sigmoid", "keras.losses.BinaryCrossentropy()"),
              "softmax_crossentropy": ("cce_probabilities", "softmax", "keras.losses.SparseCategoricalCrossentropy()")}


def _clipping_text() -> str:
    if BACKEND == "tensorflow":
        return "Keras on TF switches to the logits path (the Softmax / Sigmoid op's input, inside tf.function)"
    return f"clipped to [{keras.config.epsilon():g}, 1-{keras.config.epsilon():g}]"


# ------------------------------------------------------------------------------------------------------- the model
class Model(ModelBase):
    capabilities = CAPABILITIES

    def __init__(self, spec: ModelSpec, weights: list[np.ndarray], options: BuildOptions) -> None:
        builders = [lookup(LAYER_BUILDERS, layer, NAME) for layer in spec.layers]  # before any work
        opt_builder = lookup(OPTIMIZER_BUILDERS, spec.optimizer, NAME)
        if BACKEND == "torch" and options.dtype == "float64":
            problem = torch_float64_problem()
            if problem:
                raise Unsupported(problem)
        super().__init__(spec, weights, options)
        if options.dtype == "float64" and BACKEND == "jax" and not jax.config.jax_enable_x64:
            raise Unsupported("Keras on JAX float64 needs JAX_ENABLE_X64=1 before JAX is imported (it is off in this "
                              "process, so float64 arrays would silently become float32)")
        if options.device not in devices():
            raise Unsupported(f"device {options.device} not available to Keras on {BACKEND} (has {devices()})")
        self.info = {"keras_backend": BACKEND, "keras_version": keras.__version__,
                     "framework_version": _framework_version(), "device": options.device}
        if BACKEND in ("tensorflow",):
            self.info["TF_ENABLE_ONEDNN_OPTS"] = os.environ.get("TF_ENABLE_ONEDNN_OPTS",
                                                                "unset (oneDNN on by default on x86)")
        _set_threads(options.threads, self.info)
        self.np_dtype = np.dtype(options.dtype)
        keras.config.set_floatx(options.dtype)
        keras.config.set_dtype_policy(options.dtype)
        # "cpu" / "gpu", not "cpu:0": on torch, keras.device("cpu:0") makes every variable a non-leaf copy
        # (Parameter(...).to("cpu:0")), so backward() leaves no gradients ("No gradients provided for any variable")
        self.device = "gpu" if options.device == "cuda" else "cpu"
        self.t = 0  # updates applied so far: the step whose dropout masks the next update uses
        self.diffs: list[str] = []
        self.settings: dict[str, str] = {}
        self.mask_inputs: list = []
        self.used: dict[str, set[str]] = {"batchnorm": set(), "layernorm": set(), "avgpool": set(), "gelu": set(),
                                         "tanh": set()}
        self.out_activation: str | None = None  # native loss_form: the output layer's sigmoid / softmax
        weights_cw = spec.loss.class_weights
        self.class_weight = {k: float(w) for k, w in enumerate(weights_cw)} if weights_cw else None
        self._tf_grads = self._jax_grads = self._jax_predict = None  # compiled on first use

        with keras.device(self.device):
            self.loss_obj = self._loss(spec)
            self.model, klayers = self._build(spec, builders)
            self._weight_vars = self._bind(spec.param_entries(), klayers, "weight")
            self._state_vars = self._bind(spec.state_entries(), klayers, "state")
            if len(self.model.trainable_variables) != len(self._weight_vars):
                raise ValueError(f"{spec.name}: the Keras model has {len(self.model.trainable_variables)} trainable "
                                 f"variables, the spec {len(self._weight_vars)} weights")
            for v, w in zip(self._weight_vars, weights):
                v.assign(np.asarray(w, self.np_dtype))
            for v, s in zip(self._state_vars, init_state(spec)):
                v.assign(np.asarray(s, self.np_dtype))
            if BACKEND == "torch" and not all(v.value.is_leaf for v in self.model.trainable_variables):
                raise RuntimeError("Keras on torch made non-leaf variables: autograd would give them no gradients")
            self.lr = self._learning_rate(spec)
            self.clip_kw = self._clip(spec)
            self.optimizer = opt_builder(self, spec.optimizer)
            jit = True if options.fast else "auto"
            self.model.compile(optimizer=self.optimizer, loss=self.loss_obj, jit_compile=jit)
            self.info["jit_compile"] = bool(self.model.jit_compile)
        for what, used in self.used.items():
            if used:
                self.info[what] = "; ".join(sorted(used))
        if spec.random_layers:
            rng = "torch.nn.functional.dropout, torch's global RNG" if BACKEND == "torch" else "Keras' seed generator"
            self.info["dropout"] = (f"keras.layers.Dropout(rate): {rng}" if self.native("dropout_rng") else
                                    "MaskDropout: the harness's masks as model inputs [x, mask_0, ...]")
        if options.mode == "native":
            self.info["native_differences"] = list(dict.fromkeys(self.diffs))
            self.info["native_settings"] = dict(self.settings)

    # -- native bookkeeping -----------------------------------------------------------------------------------------
    def note(self, key: str, setting: str, *diffs: str) -> None:
        """Native key ``key`` changed this run: ``setting`` is the Keras API and value used, ``diffs`` the prose."""
        self.native(key)  # KeyError for a key NATIVE_KEYS lacks
        self.settings[key] = setting if key not in self.settings else f"{self.settings[key]}; {setting}"
        self.diffs.extend(diffs)

    def precision_default(self, what: str, short: str) -> bool:
        """A Keras built-in that computes below the run's precision (``what`` says how): native ``matmul_precision``
        (the framework's default compute precision) keeps it and notes it (True); else the caller runs its written-out
        version (False)."""
        if not self.native("matmul_precision"):
            return False
        if short not in self.settings.get("matmul_precision", ""):
            self.note("matmul_precision", f"Keras' own {short} ({BACKEND}, float64 run)", what)
        return True

    def set_optimizer(self, kind: str, call: str) -> None:
        extra = []
        if self.clip_kw:
            extra.append(", ".join(f"{k}={fmt(v)}" for k, v in self.clip_kw.items()))
        if self.spec.schedule is not None:
            extra.append(f"learning_rate=ExponentialDecay({fmt(self.spec.optimizer.lr)}, "
                         f"{self.spec.schedule.every}, {fmt(self.spec.schedule.factor)}, staircase=True)")
        self.info["optimizer"] = f"{kind}; {call}" + "".join(f"; {e}" for e in extra)

    # -- building ---------------------------------------------------------------------------------------------------
    def _learning_rate(self, spec: ModelSpec):
        """The optimizer's ``learning_rate``: the spec's lr, or ``ExponentialDecay(staircase=True)`` for a StepDecay
        (aligned: lr and factor as NumPy scalars of the run's dtype; native ``lr_schedule``: Python floats, which TF
        turns into a float32 tensor)."""
        lr, sched = spec.optimizer.lr, spec.schedule
        if sched is None:
            return float(lr)
        decay = keras.optimizers.schedules.ExponentialDecay
        if self.native("lr_schedule"):
            got = keras.backend.standardize_dtype(ops.convert_to_tensor(float(lr)).dtype)
            if got != self.options.dtype:
                self.note("lr_schedule", f"keras.optimizers.schedules.ExponentialDecay({fmt(lr)}, {sched.every}, "
                                         f"{fmt(sched.factor)}, staircase=True): computed in {got} on {BACKEND}",
                          f"learning-rate schedule: ExponentialDecay makes the Python float initial_learning_rate a "
                          f"{got} tensor on {BACKEND}, so lr_t is computed in {got} (spec: {self.options.dtype})")
            return decay(float(lr), sched.every, float(sched.factor), staircase=True)
        cast = self.np_dtype.type
        return decay(cast(lr), sched.every, cast(sched.factor), staircase=True)

    def _clip(self, spec: ModelSpec) -> dict:
        """The optimizer's clipping argument: ``global_clipnorm`` or ``clipnorm`` (per variable)."""
        clip = spec.clip
        if clip is None:
            return {}
        scope = clip.scope
        if scope == "global" and self.native("clip_scope"):
            scope = "per_tensor"
            self.note("clip_scope", f"optimizer clipnorm={fmt(clip.max_norm)} (per variable)",
                      "gradient clipping per variable: clipnorm (spec: the global norm)")
        return {"global_clipnorm": float(clip.max_norm)} if scope == "global" else {"clipnorm": float(clip.max_norm)}

    def _loss(self, spec: ModelSpec):
        kind, red = spec.loss.kind, spec.loss.reduction
        reduction = "sum" if red == "sum" else "sum_over_batch_size"
        if kind in LOSS_FORMS and self.native("loss_form"):  # Keras' defaults: mean over the batch, probabilities in
            kind, self.out_activation, api = LOSS_FORMS[spec.loss.kind]
            diffs = []
            if red != "mean":
                diffs.append(f"loss reduced by the mean over the batch (Keras' default; spec {red})")
                reduction = "sum_over_batch_size"
            if self.out_activation:
                diffs.append(f"{self.out_activation} output layer; the loss takes its probabilities (spec: logits)")
                what = "BCE on sigmoid" if self.out_activation == "sigmoid" else "softmax CE on"
                diffs.append(f"{what} probabilities: {_clipping_text()}")
            else:
                diffs.append("loss 'mse': mean over output units and batch (spec: sum of squared errors)")
            on = f" on a {self.out_activation} output layer" if self.out_activation else ""
            self.note("loss_form", f"{api}{on}, reduction 'sum_over_batch_size'", *diffs)
        elif kind == "sparse_categorical_crossentropy" and self.native("sparse_cce_probabilities"):
            kind = "cce_probabilities"
            how = ("on TF the logits are recovered from the Softmax op" if BACKEND == "tensorflow" else
                   f"p clipped to [{keras.config.epsilon():g}, 1 - {keras.config.epsilon():g}]")
            self.note("sparse_cce_probabilities", f"keras.losses.SparseCategoricalCrossentropy() (from_logits=False; "
                                                  f"{how})",
                      f"sparse categorical crossentropy on the softmax output: {_clipping_text()} (spec: -log p[y], "
                      f"no clipping)")
        return LOSS_BUILDERS[kind](self, reduction)

    def _build(self, spec: ModelSpec, builders):
        """The functional model ``[x, *dropout masks] -> output`` and, per spec layer, the Keras layer holding its
        variables (None for layers without)."""
        x = keras.Input(shape=tuple(spec.input_shape), name="x")
        h, klayers = x, []
        for i, (layer, build) in enumerate(zip(spec.layers, builders)):
            h, k = build(self, layer, i, h)
            klayers.append(k)
        if self.out_activation:  # native loss_form: what a Keras user writes, the output layer's own activation
            h = keras.layers.Activation(self.out_activation)(h)
        return keras.Model([x, *self.mask_inputs] if self.mask_inputs else x, h), klayers

    def _bind(self, entries, klayers, what: str):
        """The Keras variables of the spec's entries, in spec order: a role is the Keras layer's attribute name."""
        out = []
        for i, layer, p in entries:
            v = getattr(klayers[i], p.role, None) if klayers[i] is not None else None
            if v is None:
                raise ValueError(f"{self.spec.name}: layer {i} ({type(layer).__name__}) has no Keras variable for "
                                 f"its {what} {p.name!r}")
            if tuple(v.shape) != tuple(p.shape):
                raise ValueError(f"{self.spec.name}: layer {i} {p.name} has Keras shape {tuple(v.shape)}, the spec "
                                 f"{p.shape}")
            out.append(v)
        return out

    # -- data -------------------------------------------------------------------------------------------------------
    def _x(self, x):
        if ops.is_tensor(x):  # staged by to_device
            return x
        return np.ascontiguousarray(x, dtype=self.np_dtype)

    def _y(self, y):
        if ops.is_tensor(y):
            return y
        return np.ascontiguousarray(y, dtype=np.int64 if self.spec.loss.integer_labels else self.np_dtype)

    def _sample_weight(self, y):
        """The class weights as per-sample weights ``w[y]`` (what ``class_weight`` becomes in ``train_on_batch``),
        or None."""
        if self.class_weight is None:
            return None
        labels = np.asarray(ops.convert_to_numpy(y) if ops.is_tensor(y) else y).astype(np.int64)
        return np.asarray(self.spec.loss.class_weights, dtype=self.np_dtype)[labels]

    def _inputs(self, x, step: int | None):
        """The model's inputs for a batch: ``x`` alone, or ``[x, *masks]`` with training step ``step``'s dropout masks
        (``None``: inference, ones; MaskDropout ignores them there)."""
        x = self._x(x)
        if not self.mask_inputs:
            return x
        b = int(x.shape[0])
        if step is None:
            masks = [np.ones((b, *s), self.np_dtype) for s in (self.spec.input_shapes()[i]
                                                                for i in self.spec.random_layers)]
        else:
            masks = self.dropout_masks(step, b, self.np_dtype)
        if ops.is_tensor(x):  # x staged by to_device: Keras on torch refuses a list mixing tensors and arrays
            masks = [ops.convert_to_tensor(a) for a in masks]
        return [x, *masks]

    def to_device(self, xs, ys):
        """The batches as backend tensors on the model's device, made before any clock is read."""
        with keras.device(self.device):
            return ([ops.convert_to_tensor(self._x(x)) for x in xs],
                    [ops.convert_to_tensor(self._y(y)) for y in ys])

    # -- training ---------------------------------------------------------------------------------------------------
    def train_step(self, x, y):
        with keras.device(self.device):
            loss = float(self.model.train_on_batch(self._inputs(x, self.t), self._y(y),
                                                   class_weight=self.class_weight))
        self.t += 1
        return loss

    def train_steps(self, xs, ys):
        return np.array([self.train_step(x, y) for x, y in zip(xs, ys)], dtype=np.float64)

    def fit_epoch(self, xs, ys) -> dict:
        """``fit`` for one epoch over the stacked batches ``xs[k]`` (``shuffle=False``, ``batch_size=len(xs[0])``),
        with the dropout masks of steps t..t+k-1 stacked the same way.

        Returns ``{"running_mean": the per-batch logged loss, "losses": per-step losses reconstructed from it as
        (k+1)*m_k - k*m_{k-1}}``.  The reconstruction carries the running mean's rounding times k, relative to the
        mean, not to the step's loss -- measured: Pima float32, batch 10, 200 steps: 2.1e-5 relative (the float32
        loss tolerance is 1e-5); MNIST MLP float64, batch 1, 200 steps: scaled error 1.0 at a step whose loss is ~0.
        So ``train_steps`` uses ``train_on_batch``; the weights after ``fit`` are bit-identical to it (tested).
        """
        n, b = len(xs), len(xs[0])
        x = self._x(np.reshape(xs, (n * b,) + tuple(np.shape(xs)[2:])))
        y = self._y(np.reshape(ys, (n * b,) + tuple(np.shape(ys)[2:])))
        if self.mask_inputs:
            per_step = [self.dropout_masks(self.t + k, b, self.np_dtype) for k in range(n)]
            x = [x, *(np.concatenate([m[j] for m in per_step]) for j in range(len(self.mask_inputs)))]
        means: list[float] = []

        class Log(keras.callbacks.Callback):
            def on_train_batch_end(self, batch, logs=None):
                means.append(float(logs["loss"]))

        with keras.device(self.device):
            self.model.fit(x, y, batch_size=b, epochs=1, shuffle=False, verbose=0, callbacks=[Log()],
                           class_weight=self.class_weight)
        self.t += n
        m = np.array(means, dtype=np.float64)
        k = np.arange(len(m), dtype=np.float64)
        losses = m.copy()
        losses[1:] = (k[1:] + 1) * m[1:] - k[1:] * m[:-1]
        return {"running_mean": m, "losses": losses}

    # -- gradients without an update ----------------------------------------------------------------------------------
    def _total_loss(self, y, out, sample_weight, extra_losses):
        """What ``Trainer.compute_loss`` computes: the compiled loss (class weights as sample weights) plus the
        regularization losses (the L2 penalty)."""
        loss = self.loss_obj(y, out, sample_weight=sample_weight)
        for extra in extra_losses:
            loss = loss + ops.cast(extra, loss.dtype)
        return loss

    def gradients(self, x, y):
        with keras.device(self.device):
            inputs, sw, y = self._inputs(x, self.t), self._sample_weight(y), self._y(y)
            if BACKEND == "jax":  # stateless: the new non-trainable values are discarded
                loss, grads = self._grads_jax(inputs, y, sw)
            else:
                saved = [np.array(ops.convert_to_numpy(v.value)) for v in self.model.non_trainable_variables]
                native_rng = BACKEND == "torch" and self.native("dropout_rng") and self.spec.random_layers
                rng = self._torch_rng() if native_rng else None
                try:
                    grads_fn = self._grads_tf if BACKEND == "tensorflow" else self._grads_torch
                    loss, grads = grads_fn(inputs, y, sw)
                finally:  # the training-mode pass moved BatchNorm's statistics and the seed generators: put them back
                    for v, s in zip(self.model.non_trainable_variables, saved):
                        v.assign(s)
                    if rng is not None:  # native dropout on torch draws from torch's global generator
                        self._torch_rng(rng)
        return float(loss), [np.array(ops.convert_to_numpy(g), dtype=self.np_dtype) for g in grads]

    def _torch_rng(self, state=None):
        """torch's global RNG state (CPU, and CUDA on a GPU run), or with ``state`` put it back."""
        cuda = self.options.device == "cuda"
        if state is None:
            return torch.get_rng_state(), torch.cuda.get_rng_state() if cuda else None
        torch.set_rng_state(state[0])
        if cuda:
            torch.cuda.set_rng_state(state[1])
        return None

    def _grads_tf(self, inputs, y, sw):
        """Inside a ``tf.function``, as ``train_on_batch`` runs: Keras' TF losses recover the logits from a Softmax /
        Sigmoid op only in a graph (``_get_logits``), so an eager tape would compute another native loss."""
        if self._tf_grads is None:
            weight_vars = self._weight_vars

            @tf.function(reduce_retracing=True)
            def grads(inputs, y, sw):
                with tf.GradientTape() as tape:
                    out = self.model(inputs, training=True)
                    loss = self._total_loss(y, out, sw, self.model.losses)
                return loss, tape.gradient(loss, weight_vars)

            self._tf_grads = grads
        return self._tf_grads(inputs, y, sw)

    def _grads_jax(self, inputs, y, sw):
        """``jax.value_and_grad`` of the stateless call, under ``jax.jit`` (one XLA compile per input shape, as
        ``train_on_batch``'s; eager, every primitive and its VJP compiles on first use: 9 s for a small MLP)."""
        tvars = self.model.trainable_variables
        trainable = [v.value for v in tvars]
        non_trainable = [v.value for v in self.model.non_trainable_variables]
        if self._jax_grads is None:
            def f(tv, ntv, inputs, y, sw):
                out, _, losses = self.model.stateless_call(tv, ntv, inputs, training=True, return_losses=True)
                return self._total_loss(y, out, sw, losses)

            self._jax_grads = jax.jit(jax.value_and_grad(f))
        loss, grads = self._jax_grads(trainable, non_trainable, inputs, y, sw)
        index = {id(v): k for k, v in enumerate(tvars)}
        return loss, [grads[index[id(v)]] for v in self._weight_vars]

    def _grads_torch(self, inputs, y, sw):
        params = [v.value for v in self._weight_vars]
        for p in params:
            p.grad = None
        if isinstance(inputs, list):
            inputs = [ops.convert_to_tensor(a) for a in inputs]
        else:
            inputs = ops.convert_to_tensor(inputs)
        out = self.model(inputs, training=True)
        sw = None if sw is None else ops.convert_to_tensor(sw)
        loss = self._total_loss(ops.convert_to_tensor(y), out, sw, self.model.losses)
        loss.backward()
        grads = [p.grad.detach().clone() for p in params]
        for p in params:
            p.grad = None  # leave nothing behind for the next train step
        return loss.detach(), grads

    # -- inference --------------------------------------------------------------------------------------------------
    def predict(self, x):
        with keras.device(self.device):
            inputs = self._inputs(x, None)
            if isinstance(inputs, list):
                inputs = [ops.convert_to_tensor(a) for a in inputs]
            else:
                inputs = ops.convert_to_tensor(inputs)
            out = self._predict_jax(inputs) if BACKEND == "jax" else self.model(inputs, training=False)
            if not self.out_activation:  # a native loss_form model already ends in its sigmoid / softmax
                pred = self.spec.loss.prediction
                if pred == "sigmoid":
                    out = ops.sigmoid(out)
                elif pred == "softmax":
                    out = ops.softmax(out, axis=-1)
            return np.asarray(ops.convert_to_numpy(out))

    def _predict_jax(self, inputs):
        """The inference-mode stateless call under ``jax.jit`` (eager, its first call compiles every primitive)."""
        if self._jax_predict is None:
            self._jax_predict = jax.jit(lambda tv, ntv, inputs: self.model.stateless_call(tv, ntv, inputs,
                                                                                          training=False)[0])
        return self._jax_predict([v.value for v in self.model.trainable_variables],
                                 [v.value for v in self.model.non_trainable_variables], inputs)

    def get_weights(self):
        return [np.array(ops.convert_to_numpy(v.value)) for v in self._weight_vars]

    def get_state(self):
        return [np.array(ops.convert_to_numpy(v.value), dtype=self.np_dtype) for v in self._state_vars]

    def sync(self):
        if self.options.device != "cuda":
            return
        if BACKEND == "torch":
            torch.cuda.synchronize()
        elif BACKEND == "jax":
            for v in self.model.variables:
                v.value.block_until_ready()
        elif BACKEND == "tensorflow":
            tf.test.experimental.sync_devices()

    def gpu_peak_mb(self) -> float | None:
        """Peak MiB the Keras backend's framework had allocated on the GPU in this process, from the same counter as
        that framework's own backend module: on torch ``torch.cuda.max_memory_allocated`` of the current CUDA device
        (Keras's "gpu" scope is torch's "cuda"), on JAX ``jax.devices("gpu")[0].memory_stats()["peak_bytes_in_use"]``
        (Keras's "gpu" is the GPU with id 0; None if the allocator keeps no such statistic), on TensorFlow
        ``tf.config.experimental.get_memory_info("GPU:0")["peak"]``.  None on the CPU."""
        if self.options.device != "cuda":
            return None
        if BACKEND == "torch":
            return to_mib(torch.cuda.max_memory_allocated(torch.device("cuda")))
        if BACKEND == "jax":
            return xla_peak_mb(jax.devices("gpu")[0].memory_stats())
        if BACKEND == "tensorflow":
            return to_mib(tf.config.experimental.get_memory_info("GPU:0")["peak"])
        return None
