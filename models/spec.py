"""Framework-free model specs: frozen dataclasses of plain data.

A spec says *what* network to train (layers, loss, optimizer, initializer, data, batch sizes); every backend compiles
the same spec.  Backends read the fields of a spec and never its name.

Conventions that every backend follows (see ``shared/guides/numerics.md`` for the measurements behind them):

* Canonical weight layout: dense kernels ``(in, out)``, conv kernels HWIO, activations NHWC, flatten in (h, w, c)
  order.  Each layer lists its arrays as typed :class:`ParamSpec` entries (name, shape, role, trainable or state,
  initializer); the trainable ones, in layer order, are the weights (``[kernel_0, bias_0, kernel_1, ...]``, named by
  :meth:`ModelSpec.param_names`), the others the state (:meth:`ModelSpec.state_names`: BatchNorm's moving statistics).
* Training mode (``train_step``, ``gradients``) and inference mode (``predict``): BatchNorm normalises with the batch's
  statistics and updates its state in training, uses the moving statistics in inference; Dropout drops in training
  only, with masks the harness draws (:func:`dropout_masks`).
* A classifier's last layer is linear (logits); its sigmoid / softmax is folded into the loss, which every backend
  computes from logits with the stable formula.  :attr:`Loss.prediction` says what predictions apply on top.
* Adam hyperparameters are exactly representable in float32 (see :func:`f32`), and the epsilon convention is written
  out: ``"eps_hat"`` (TF1, Keras) is ``w -= lr*sqrt(1-b2^t)/(1-b1^t) * m/(sqrt(v)+eps)``; ``"eps_v_hat"`` (torch, optax)
  is ``w -= lr * m_hat/(sqrt(v_hat)+eps)``.  Only ``eps_hat`` can be followed by all six backends (Keras cannot change
  its epsilon per step), so every built-in spec uses it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, replace
from typing import Any, Union

import numpy as np

# Activations a Dense / Conv2D may apply; an Activation layer may also apply the parametrised ones ("leaky_relu" with its
# ``negative_slope``, "gelu" with its ``approximate``).  "softmax" is over the last axis.
LAYER_ACTIVATIONS = ("linear", "sigmoid", "relu", "tanh", "softmax")
ACTIVATIONS = LAYER_ACTIVATIONS + ("leaky_relu", "gelu")
GELU_FORMS = ("none", "tanh")  # gelu exact (x * Phi(x), with erf) or its tanh approximation
PADDINGS = ("valid", "same")
LOSSES = ("sse", "mse", "binary_crossentropy", "softmax_crossentropy", "sparse_categorical_crossentropy")
REDUCTIONS = ("sum", "mean")
ADAM_CONVENTIONS = ("eps_hat", "eps_v_hat")
INITIALIZERS = ("glorot_uniform", "normal", "uniform", "zeros")
CLIP_SCOPES = ("global", "per_tensor")
MOMENTUM_FORMS = ("accumulator", "velocity")
DTYPES = ("float32", "float64")


def f32(x: float) -> float:
    """The Python float nearest to ``x`` that float32 represents exactly (``f32(0.999) == 0.9990000128746033``)."""
    return float(np.float32(x))


def _check_choice(what: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ValueError(f"{what} {value!r} is not supported; expected one of {', '.join(valid)}")


def _check_f32(owner: str, obj, names: tuple[str, ...]) -> None:
    """Hyperparameters every backend must apply bit-identically in a float32 run are exactly representable there."""
    for name in names:
        v = getattr(obj, name)
        if f32(v) != v:
            raise ValueError(f"{owner} {name}={v!r} is not exactly representable in float32; use "
                             f"models.spec.f32({v!r})")


def _pair(v, what: str) -> tuple[int, int]:
    t = (int(v), int(v)) if isinstance(v, (int, np.integer)) else tuple(int(k) for k in v)
    if len(t) != 2 or min(t) < 1:
        raise ValueError(f"{what} must be a positive int or a pair of them, got {v!r}")
    return t


def same_padding(size: int, window: int, stride: int) -> tuple[int, int]:
    """TF's / Keras' ``padding="same"`` along one axis: output ``ceil(size / stride)``, and the padding that needs split
    as ``(total // 2, total - total // 2)``: the odd one goes to the bottom / right (torch's ``padding=k//2`` pads
    both sides equally, and ``padding="same"`` is refused at stride > 1)."""
    out = -(-size // stride)
    total = max((out - 1) * stride + window - size, 0)
    return total // 2, total - total // 2


def window_output(size: int, window: int, stride: int, padding: str) -> int:
    """Output length of a convolution / pooling window along one axis ("valid": windows inside the input only)."""
    if padding == "same":
        return -(-size // stride)
    return (size - window) // stride + 1


# ----------------------------------------------------------------------------------------------------------- layers
# A parameter's role decides its initial value and whether the optimizer trains it: the spec never infers a role from
# a shape.  "weights" / "biases" mean the spec's Init for kernels / biases; the others are constants.
ROLES: dict[str, tuple[str, bool]] = {  # role -> (initializer, trainable)
    "kernel": ("weights", True),
    "bias": ("biases", True),
    "gamma": ("ones", True),
    "beta": ("zeros", True),
    "moving_mean": ("zeros", False),
    "moving_variance": ("ones", False),
}


@dataclass(frozen=True)
class ParamSpec:
    """One array a layer owns: its name inside the layer, shape, role, whether it is trained (else it is *state*,
    updated by the forward pass in training mode) and its initializer."""

    name: str
    shape: tuple[int, ...]
    role: str
    trainable: bool
    init: str

    @classmethod
    def of(cls, role: str, shape: tuple[int, ...]) -> "ParamSpec":
        init, trainable = ROLES[role]
        return cls(role, tuple(int(s) for s in shape), role, trainable, init)


class Layer:
    """What every layer says about itself (subclasses are frozen dataclasses of plain data).

    * ``prefix``: the stem of its parameter names (``dense0/kernel``);
    * ``output_shape(in_shape)``: its output shape for one sample, or ValueError with what it needs;
    * ``params(in_shape)``: its arrays, trainable and state, in canonical layout and order;
    * ``couples_batch``: in training mode a sample's output depends on the other samples of its batch;
    * ``random``: in training mode it draws random numbers (the harness hands every backend the same ones).
    """

    prefix = "layer"
    couples_batch = False
    random = False

    def output_shape(self, in_shape: tuple[int, ...]) -> tuple[int, ...]:
        raise NotImplementedError

    def params(self, in_shape: tuple[int, ...]) -> tuple[ParamSpec, ...]:
        return ()


def _needs_image(layer: Layer, shape: tuple[int, ...]) -> None:
    if len(shape) != 3:
        raise ValueError(f"{type(layer).__name__} needs an (h, w, c) input, got shape {shape}")


@dataclass(frozen=True)
class Dense(Layer):
    units: int  # output features
    activation: str = "linear"
    use_bias: bool = True
    prefix = "dense"

    def __post_init__(self) -> None:
        _check_choice("Dense activation", self.activation, LAYER_ACTIVATIONS)

    def output_shape(self, in_shape):
        if len(in_shape) != 1:
            raise ValueError(f"Dense needs a flat input, got shape {in_shape}; add Flatten() before it")
        return (self.units,)

    def params(self, in_shape):
        kernel = ParamSpec.of("kernel", (in_shape[0], self.units))
        return (kernel, ParamSpec.of("bias", (self.units,))) if self.use_bias else (kernel,)


@dataclass(frozen=True)
class Conv2D(Layer):
    """2-D cross-correlation (what every framework calls convolution), NHWC, kernel HWIO.

    ``padding="same"`` is TF's (:func:`same_padding`: output ``ceil(in / stride)``, an odd total padding puts the extra
    row / column at the bottom / right), zeros; ``"valid"`` pads nothing."""

    filters: int  # output channels
    kernel_size: tuple[int, int] = (3, 3)
    activation: str = "linear"
    padding: str = "valid"
    use_bias: bool = True
    strides: tuple[int, int] = (1, 1)
    prefix = "conv"

    def __post_init__(self) -> None:
        _check_choice("Conv2D activation", self.activation, LAYER_ACTIVATIONS)
        _check_choice("Conv2D padding", self.padding, PADDINGS)
        object.__setattr__(self, "kernel_size", _pair(self.kernel_size, "Conv2D kernel_size"))
        object.__setattr__(self, "strides", _pair(self.strides, "Conv2D strides"))

    def pads(self, in_shape) -> tuple[tuple[int, int], tuple[int, int]]:
        """((top, bottom), (left, right)) zero padding for an (h, w, c) input."""
        if self.padding == "valid":
            return (0, 0), (0, 0)
        return tuple(same_padding(n, k, s) for n, k, s in zip(in_shape[:2], self.kernel_size, self.strides))

    def output_shape(self, in_shape):
        _needs_image(self, in_shape)
        h, w = (window_output(n, k, s, self.padding) for n, k, s in zip(in_shape[:2], self.kernel_size, self.strides))
        return (h, w, self.filters)

    def params(self, in_shape):
        kernel = ParamSpec.of("kernel", (*self.kernel_size, in_shape[2], self.filters))  # HWIO
        return (kernel, ParamSpec.of("bias", (self.filters,))) if self.use_bias else (kernel,)


@dataclass(frozen=True)
class MaxPool2D(Layer):
    """Max over square windows, 'valid' (trailing rows / columns that fill no window dropped); the gradient goes to the
    first maximum of each window (row-major)."""

    pool_size: int = 2  # square window
    strides: int | None = None  # None: pool_size (non-overlapping windows)
    prefix = "pool"

    def __post_init__(self) -> None:
        if int(self.pool_size) < 1 or (self.strides is not None and int(self.strides) < 1):
            raise ValueError(f"MaxPool2D needs pool_size >= 1 and strides >= 1, got {self.pool_size!r}, "
                             f"{self.strides!r}")

    @property
    def stride(self) -> int:
        return int(self.pool_size if self.strides is None else self.strides)

    def output_shape(self, in_shape):
        _needs_image(self, in_shape)
        p, s = self.pool_size, self.stride
        return (window_output(in_shape[0], p, s, "valid"), window_output(in_shape[1], p, s, "valid"), in_shape[2])


@dataclass(frozen=True)
class AveragePooling2D(Layer):
    """Mean over square windows.  ``padding="same"`` pads as :func:`same_padding` and averages over the window's
    values *inside* the image only (TF / Keras; torch's ``count_include_pad=True`` default and flax's
    ``count_include_pad=True`` divide by the full window, padded zeros included)."""

    pool_size: int = 2
    strides: int | None = None  # None: pool_size
    padding: str = "valid"
    prefix = "avgpool"

    def __post_init__(self) -> None:
        _check_choice("AveragePooling2D padding", self.padding, PADDINGS)
        if int(self.pool_size) < 1 or (self.strides is not None and int(self.strides) < 1):
            raise ValueError(f"AveragePooling2D needs pool_size >= 1 and strides >= 1, got {self.pool_size!r}, "
                             f"{self.strides!r}")

    @property
    def stride(self) -> int:
        return int(self.pool_size if self.strides is None else self.strides)

    def pads(self, in_shape) -> tuple[tuple[int, int], tuple[int, int]]:
        if self.padding == "valid":
            return (0, 0), (0, 0)
        return tuple(same_padding(n, self.pool_size, self.stride) for n in in_shape[:2])

    def output_shape(self, in_shape):
        _needs_image(self, in_shape)
        h, w = (window_output(n, self.pool_size, self.stride, self.padding) for n in in_shape[:2])
        return (h, w, in_shape[2])


@dataclass(frozen=True)
class Flatten(Layer):
    """NHWC -> (N, h*w*c) in (h, w, c) order."""

    prefix = "flatten"

    def output_shape(self, in_shape):
        return (int(np.prod(in_shape)),)


@dataclass(frozen=True)
class Activation(Layer):
    """An activation on its own (after a BatchNorm, say), including the parametrised ones:

    * ``leaky_relu``: ``x`` where ``x > 0``, else ``negative_slope * x`` (defaults differ: keras.layers.LeakyReLU 0.3,
      keras.activations / tf.nn 0.2, torch and jax.nn 0.01; the spec's default is 0.2);
    * ``gelu``: ``approximate="none"`` is ``x * Phi(x) = 0.5 * x * (1 + erf(x / sqrt(2)))``, ``"tanh"`` is
      ``0.5 * x * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 * x**3)))`` (torch / keras.activations default to the exact
      form, jax.nn.gelu / keras.ops.gelu to the approximation);
    * ``softmax`` over the last axis, ``tanh``, and the plain ones.
    """

    activation: str
    negative_slope: float = f32(0.2)  # leaky_relu only
    approximate: str = "none"  # gelu only: "none" (erf) or "tanh"
    prefix = "act"

    def __post_init__(self) -> None:
        _check_choice("activation", self.activation, ACTIVATIONS)
        _check_choice("gelu approximate", self.approximate, GELU_FORMS)
        _check_f32("Activation", self, ("negative_slope",))

    def output_shape(self, in_shape):
        return tuple(in_shape)


@dataclass(frozen=True)
class BatchNorm(Layer):
    """Batch normalization over every axis but the last (the features of a dense input, the channels of NHWC).

    Training mode: ``y = gamma * (x - mean) / sqrt(var + epsilon) + beta`` with the batch's mean and *biased* variance,
    and the state moves as ``moving = momentum * moving + (1 - momentum) * batch_statistic``, where the variance stored
    is the batch variance times ``n / (n - 1)`` when ``unbiased_moving_variance`` (n: values per feature in the batch).
    Inference mode uses the moving statistics instead of the batch's.

    ``momentum`` is written in Keras' / TF's convention (the weight of the *old* value); torch's ``momentum`` argument
    is ``1 - momentum``.  Defaults are Keras' (0.99, 1e-3, biased); torch's are 0.9 here, 1e-5, unbiased.
    """

    momentum: float = f32(0.99)
    epsilon: float = f32(1e-3)
    unbiased_moving_variance: bool = False
    prefix = "bn"
    couples_batch = True

    def __post_init__(self) -> None:
        _check_f32("BatchNorm", self, ("momentum", "epsilon"))
        if not 0.0 <= self.momentum < 1.0 or not self.epsilon > 0.0:
            raise ValueError(f"BatchNorm needs 0 <= momentum < 1 and epsilon > 0, got momentum={self.momentum!r}, "
                             f"epsilon={self.epsilon!r}")

    def output_shape(self, in_shape):
        return tuple(in_shape)

    def params(self, in_shape):
        c = (in_shape[-1],)
        return tuple(ParamSpec.of(role, c) for role in ("gamma", "beta", "moving_mean", "moving_variance"))


@dataclass(frozen=True)
class LayerNorm(Layer):
    """Layer normalization over the last axis (the features of a flat input, the channels of each NHWC pixel):
    ``y = gamma * (x - mean) / sqrt(var + epsilon) + beta`` with the sample's own mean and biased variance, in training
    and inference alike (no state, no coupling between samples).  Epsilon defaults differ: Keras 1e-3, torch 1e-5,
    flax 1e-6; the spec's default is Keras'.  (torch's ``nn.LayerNorm([C, H, W])`` normalises over more axes: say
    ``nn.LayerNorm(C)`` on channels-last data for this layer.)"""

    epsilon: float = f32(1e-3)
    prefix = "ln"

    def __post_init__(self) -> None:
        _check_f32("LayerNorm", self, ("epsilon",))
        if not self.epsilon > 0.0:
            raise ValueError(f"LayerNorm needs epsilon > 0, got {self.epsilon!r}")

    def output_shape(self, in_shape):
        return tuple(in_shape)

    def params(self, in_shape):
        c = (in_shape[-1],)
        return (ParamSpec.of("gamma", c), ParamSpec.of("beta", c))


@dataclass(frozen=True)
class Dropout(Layer):
    """Inverted dropout: in training mode each value is kept with probability ``1 - rate`` and scaled by
    ``1 / (1 - rate)``; inference mode is the identity.  In aligned mode the harness draws the masks
    (:func:`dropout_masks`) and every backend applies the same ones."""

    rate: float = 0.5
    prefix = "dropout"
    random = True

    def __post_init__(self) -> None:
        if not 0.0 <= self.rate < 1.0:
            raise ValueError(f"Dropout rate must satisfy 0 <= rate < 1, got {self.rate!r}")

    def output_shape(self, in_shape):
        return tuple(in_shape)


# The spec's vocabulary: every layer type a spec may use, by the name the JSON form writes.  A backend maps each of
# these to a builder or declares it unsupported (tests/test_conformance.py checks that it does one or the other).
LAYERS: dict[str, type[Layer]] = {c.__name__: c for c in (Dense, Conv2D, MaxPool2D, AveragePooling2D, Flatten,
                                                           Activation, BatchNorm, LayerNorm, Dropout)}


# ---------------------------------------------------------------------------------------------- loss and optimizers
@dataclass(frozen=True)
class Loss:
    """The loss, per sample then reduced over the batch, plus an optional L2 penalty.

    * ``sse``: sum over the outputs of squared errors (no 1/2); ``mse``: their *mean* over the last axis (Keras'
      ``mean_squared_error``; torch's ``nn.MSELoss`` means over every element, and broadcasts an ``(N, 1)`` output
      against ``(N,)`` targets into an ``(N, N)`` difference);
    * ``binary_crossentropy`` / ``softmax_crossentropy``: from logits (the last layer is linear), stable formulas;
    * ``sparse_categorical_crossentropy``: ``-log(p[label])`` on *probabilities* (the last layer applies softmax), with
      integer labels and no clipping (Keras clips ``p`` to ``[1e-7, 1 - 1e-7]``).
    * ``class_weights`` (integer-label losses only): sample i's loss is multiplied by the weight of its class and
      ``reduction="mean"`` divides the weighted sum by the batch size N (Keras' ``class_weight``); torch's
      ``CrossEntropyLoss(weight=...)`` divides by the sum of the batch's weights instead.
    * ``l2``: ``l2 * sum(kernel**2)`` over every kernel (role "kernel"; not biases, gamma or beta) is added to the
      reduced loss (Keras' ``kernel_regularizer=L2(l2)``); its gradient ``2 * l2 * kernel`` is in ``gradients``.
      torch's ``weight_decay=wd`` adds ``wd * p`` to every parameter's gradient (L2(l) == weight_decay 2*l, biases
      included), TF1's ``tf.nn.l2_loss`` is ``sum(w**2) / 2``.
    """

    kind: str
    reduction: str  # over the batch: "sum" or "mean" (mean of per-sample losses)
    class_weights: tuple[float, ...] = ()
    l2: float = 0.0

    def __post_init__(self) -> None:
        _check_choice("loss", self.kind, LOSSES)
        _check_choice("reduction", self.reduction, REDUCTIONS)
        object.__setattr__(self, "class_weights", tuple(float(w) for w in self.class_weights))
        if self.class_weights and not self.integer_labels:
            raise ValueError(f"class_weights need a loss with integer class labels (softmax_crossentropy, "
                             f"sparse_categorical_crossentropy), got {self.kind!r}")
        if any(not w >= 0 for w in self.class_weights) or not self.l2 >= 0:
            raise ValueError(f"class weights and l2 must be >= 0, got {self.class_weights}, l2={self.l2!r}")
        _check_f32("Loss", self, ("l2",))

    @property
    def prediction(self) -> str:
        """What turns the network output into a prediction: 'identity', 'sigmoid' or 'softmax'."""
        return {"sse": "identity", "mse": "identity", "binary_crossentropy": "sigmoid",
                "softmax_crossentropy": "softmax", "sparse_categorical_crossentropy": "identity"}[self.kind]

    @property
    def integer_labels(self) -> bool:
        """The cross-entropies over classes take integer class labels of shape (N,); the others take targets shaped
        like the output."""
        return self.kind in ("softmax_crossentropy", "sparse_categorical_crossentropy")


@dataclass(frozen=True)
class SGD:
    """``w -= lr * g`` without momentum.  With ``momentum`` mu, two forms that agree at a constant learning rate and
    part after it changes (:class:`StepDecay`):

    * ``"accumulator"`` (torch.optim.SGD, TF1 MomentumOptimizer, optax.sgd): ``b = mu * b + g``; ``w -= lr_t * b``,
      Nesterov ``w -= lr_t * (g + mu * b)``;
    * ``"velocity"`` (Keras): ``v = mu * v - lr_t * g``; ``w += v``, Nesterov ``w += mu * v - lr_t * g``.
    """

    lr: float  # w -= lr * grad
    momentum: float = 0.0
    nesterov: bool = False
    momentum_form: str = "accumulator"

    def __post_init__(self) -> None:
        _check_choice("SGD momentum_form", self.momentum_form, MOMENTUM_FORMS)
        _check_f32("SGD", self, ("momentum",))
        if not 0.0 <= self.momentum < 1.0 or (self.nesterov and self.momentum == 0):
            raise ValueError(f"SGD needs 0 <= momentum < 1 (and momentum > 0 for nesterov), got "
                             f"momentum={self.momentum!r}, nesterov={self.nesterov!r}")


@dataclass(frozen=True)
class Adam:
    lr: float = f32(0.001)
    beta1: float = f32(0.9)
    beta2: float = f32(0.999)
    epsilon: float = f32(1e-7)
    convention: str = "eps_hat"  # see the module docstring

    def __post_init__(self) -> None:
        _check_choice("Adam epsilon convention", self.convention, ADAM_CONVENTIONS)
        _check_f32(type(self).__name__, self, ("lr", "beta1", "beta2", "epsilon"))


@dataclass(frozen=True)
class AdamW(Adam):
    """Adam with decoupled weight decay: before the Adam update, ``w -= lr_t * weight_decay * w`` (every trainable
    parameter), or ``w -= weight_decay * w`` when not ``decay_times_lr`` (the paper's schedule-free form).  Defaults
    differ: torch 1e-2, Keras 4e-3, optax 1e-4; the spec's is Keras'."""

    weight_decay: float = f32(0.004)
    decay_times_lr: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_f32("AdamW", self, ("weight_decay",))


@dataclass(frozen=True)
class RMSprop:
    """``v = rho * v + (1 - rho) * g**2`` from ``v = initial_accumulator``; ``w -= lr_t * g / sqrt(v + eps)`` when
    ``epsilon_inside_sqrt`` (Keras, TF1, optax), else ``g / (sqrt(v) + eps)`` (torch).  Defaults differ: rho 0.9
    (Keras, TF1, optax) vs torch's alpha 0.99; epsilon 1e-7 / 1e-10 / 1e-8 / 1e-8; TF1 starts v at 1.0."""

    lr: float = f32(0.001)
    rho: float = f32(0.9)
    epsilon: float = f32(1e-7)
    epsilon_inside_sqrt: bool = True
    initial_accumulator: float = 0.0

    def __post_init__(self) -> None:
        _check_f32("RMSprop", self, ("lr", "rho", "epsilon", "initial_accumulator"))


@dataclass(frozen=True)
class Adagrad:
    """``a = a + g**2`` from ``a = initial_accumulator``; ``w -= lr_t * g / sqrt(a + eps)`` when ``epsilon_inside_sqrt``
    (Keras), else ``g / (sqrt(a) + eps)`` (torch, TF1 without eps).  Defaults differ: initial accumulator 0.1 (Keras,
    TF1, optax) vs 0 (torch); epsilon 1e-7 / 1e-10 / 1e-7."""

    lr: float = f32(0.001)
    initial_accumulator: float = f32(0.1)
    epsilon: float = f32(1e-7)
    epsilon_inside_sqrt: bool = True

    def __post_init__(self) -> None:
        _check_f32("Adagrad", self, ("lr", "initial_accumulator", "epsilon"))


Optimizer = Union[SGD, Adam, AdamW, RMSprop, Adagrad]
OPTIMIZERS: dict[str, type] = {c.__name__: c for c in (SGD, Adam, AdamW, RMSprop, Adagrad)}  # like LAYERS


@dataclass(frozen=True)
class ClipNorm:
    """Gradient clipping before the optimizer (the gradients ``gradients()`` reports are not clipped): ``"global"``
    scales every gradient by ``min(1, max_norm / ||all gradients||)`` (torch ``clip_grad_norm_``, which adds 1e-6 to
    the norm; ``tf.clip_by_global_norm``; ``optax.clip_by_global_norm``; Keras ``global_clipnorm``), ``"per_tensor"``
    each gradient by ``min(1, max_norm / ||g||)`` (Keras ``clipnorm``, ``tf.clip_by_norm``)."""

    max_norm: float
    scope: str = "global"

    def __post_init__(self) -> None:
        _check_choice("ClipNorm scope", self.scope, CLIP_SCOPES)
        _check_f32("ClipNorm", self, ("max_norm",))
        if not self.max_norm > 0:
            raise ValueError(f"ClipNorm max_norm must be > 0, got {self.max_norm!r}")


@dataclass(frozen=True)
class StepDecay:
    """A step learning-rate schedule, counted in updates: update ``t`` (0-based: ``t`` updates applied before it) uses
    ``lr_t = optimizer.lr * factor ** (t // every)`` (Keras ``ExponentialDecay(lr, every, factor, staircase=True)``,
    ``optax.exponential_decay(lr, every, factor, staircase=True)``, torch ``StepLR(opt, every, factor)`` stepped after
    every batch)."""

    every: int
    factor: float

    def __post_init__(self) -> None:
        _check_f32("StepDecay", self, ("factor",))
        if int(self.every) < 1 or not 0 < self.factor:
            raise ValueError(f"StepDecay needs every >= 1 and factor > 0, got {self.every!r}, {self.factor!r}")

    def lr(self, base: float, t: int) -> float:
        return float(base) * float(self.factor) ** (int(t) // int(self.every))


@dataclass(frozen=True)
class Init:
    weights: str = "glorot_uniform"  # "glorot_uniform" | "normal" (mean 0, std=scale) | "uniform" (-scale, scale)
    biases: str = "zeros"  # same choices as weights
    scale: float = 1.0  # std for "normal", limit for "uniform"; unused by glorot / zeros
    # explicit initial values, one flat tuple (C order, canonical layout) per trainable parameter in param_names()
    # order: a tutorial's own numbers (the seed argument is then ignored)
    explicit: tuple[tuple[float, ...], ...] = ()

    def __post_init__(self) -> None:
        _check_choice("initializer", self.weights, INITIALIZERS)
        _check_choice("initializer", self.biases, INITIALIZERS)
        object.__setattr__(self, "explicit", tuple(tuple(float(v) for v in a) for a in self.explicit))


INIT_PRESETS = {
    "glorot": Init("glorot_uniform", "zeros"),
    "normal": Init("normal", "normal", 1.0),
    "uniform": Init("uniform", "zeros", 0.05),
}


# --------------------------------------------------------------------------------------------------------- the spec
@dataclass(frozen=True)
class ModelSpec:
    name: str
    description: str
    input_shape: tuple[int, ...]  # one sample, NHWC without N for images
    layers: tuple[Layer, ...]
    loss: Loss
    optimizer: Optimizer
    init: Init
    dataset: str  # a name known to models.data
    batch_sizes: tuple[int, ...]  # (1, N): the two batch sizes the harness compares
    epochs: int  # the tutorial's training length
    expected_params: int  # checked by tests against param_shapes()
    dtype: str = "float32"  # the tutorial's dtype; --dtype overrides
    shuffle: bool = True  # a new seeded permutation each epoch (False: the data's own order every epoch)
    reference: str = ""  # what the tutorial reports, for the README
    clip: ClipNorm | None = None  # gradient clipping before the optimizer
    schedule: StepDecay | None = None  # the learning rate per update (None: constant)

    def __post_init__(self) -> None:
        _check_choice("dtype", self.dtype, DTYPES)
        if not self.layers:
            raise ValueError(f"model {self.name!r} has no layers")
        self.shapes()  # validates the layer sequence
        self.check_batch_size(min(self.batch_sizes), "batch_sizes")
        if self.loss.class_weights and len(self.loss.class_weights) != self.n_outputs:
            raise ValueError(f"model {self.name!r}: {len(self.loss.class_weights)} class weights for "
                             f"{self.n_outputs} classes")
        if self.init.explicit:
            shapes = self.param_shapes()
            sizes = [len(a) for a in self.init.explicit]
            if sizes != [math.prod(s) for s in shapes]:
                raise ValueError(f"model {self.name!r}: explicit initial values of sizes {sizes} for parameters "
                                 f"{dict(zip(self.param_names(), shapes))}")

    def lr_at(self, t: int) -> float:
        """The learning rate of update ``t`` (0-based: the number of updates applied before it)."""
        base = float(self.optimizer.lr)
        return base if self.schedule is None else self.schedule.lr(base, t)

    def check_batch_size(self, batch_size: int, what: str = "batch size") -> None:
        """ValueError for a batch too small for a layer: BatchNorm on flat features needs two samples (at batch 1 each
        feature's variance is zero, and torch refuses to train on it)."""
        for i, (layer, shape) in enumerate(zip(self.layers, self.input_shapes())):
            if layer.couples_batch and len(shape) == 1 and batch_size < 2:
                raise ValueError(f"{what} {batch_size} is too small for layer {i} ({type(layer).__name__} on "
                                 f"{shape[0]} flat features): a batch of 1 has one value per feature, so its variance "
                                 f"is 0; use batch sizes of at least 2")

    # -- shapes ----------------------------------------------------------------------------------------------------
    def shapes(self) -> list[tuple[int, ...]]:
        """Activation shape (without batch) after each layer; raises ValueError on an impossible sequence.

        Computed once per spec (a frozen value) and kept outside the dataclass fields, so equality, hashing and
        ``spec_to_dict`` do not see it: the NumPy backend asks for the shapes several times a step, and recomputing
        them cost its MNIST CNN about 0.2 ms of a 1.7 ms step at batch 1 (``benchmarks/overhead-mnist_cnn.md``)."""
        cached = self.__dict__.get("_shapes_cache")
        if cached is not None:
            return list(cached)
        shape = tuple(self.input_shape)
        out = []
        for i, layer in enumerate(self.layers):
            if not isinstance(layer, Layer):
                raise ValueError(f"layer {i} is a {type(layer).__name__}, not a layer of the spec vocabulary "
                                 f"({', '.join(LAYERS)}); subclass models.spec.Layer for a new one")
            try:
                shape = tuple(int(s) for s in layer.output_shape(shape))
            except ValueError as e:
                raise ValueError(f"layer {i} ({type(layer).__name__}): {e}") from None
            if not shape or min(shape) <= 0:
                raise ValueError(f"layer {i} ({type(layer).__name__}) produces an empty shape {shape}")
            out.append(shape)
        object.__setattr__(self, "_shapes_cache", tuple(out))
        return out

    @property
    def output_shape(self) -> tuple[int, ...]:
        return self.shapes()[-1]

    def input_shapes(self) -> list[tuple[int, ...]]:
        """The input shape (without batch) of each layer."""
        return [tuple(self.input_shape)] + self.shapes()[:-1]

    def entries(self) -> list[tuple[int, Layer, ParamSpec]]:
        """(layer index, layer, parameter) for every array of every layer, trainable and state, in layer order."""
        cached = self.__dict__.get("_entries_cache")
        if cached is None:
            cached = tuple((i, layer, p) for i, (layer, s) in enumerate(zip(self.layers, self.input_shapes()))
                           for p in layer.params(s))
            object.__setattr__(self, "_entries_cache", cached)
        return list(cached)

    def param_entries(self) -> list[tuple[int, Layer, ParamSpec]]:
        """The trainable parameters: what ``get_weights`` returns and the optimizer updates, in this order."""
        return [e for e in self.entries() if e[2].trainable]

    def state_entries(self) -> list[tuple[int, Layer, ParamSpec]]:
        """The non-trainable state (BatchNorm's moving statistics): what ``get_state`` returns, in this order."""
        return [e for e in self.entries() if not e[2].trainable]

    def by_layer(self, params, state) -> list[tuple[dict, dict]]:
        """Per layer: ({role: trainable array}, {role: state array}) from the flat lists in canonical order (the
        weights' and the state's), each dict in the layer's ``params()`` order; empty dicts for a layer without any."""
        p, s = iter(params), iter(state)
        return [({e.role: next(p) for e in entries if e.trainable}, {e.role: next(s) for e in entries if not e.trainable})
                for entries in (layer.params(shape) for layer, shape in zip(self.layers, self.input_shapes()))]

    def param_layers(self) -> list[tuple[int, Layer, tuple[int, ...]]]:
        """(layer index, layer, input shape) for each layer with trainable parameters."""
        return [(i, layer, s) for i, (layer, s) in enumerate(zip(self.layers, self.input_shapes()))
                if any(p.trainable for p in layer.params(s))]

    @staticmethod
    def _name(i: int, layer: Layer, p: ParamSpec) -> str:
        return f"{layer.prefix}{i}/{p.name}"

    def param_shapes(self) -> list[tuple[int, ...]]:
        return [p.shape for _, _, p in self.param_entries()]

    def param_names(self) -> list[str]:
        return [self._name(*e) for e in self.param_entries()]

    def state_shapes(self) -> list[tuple[int, ...]]:
        return [p.shape for _, _, p in self.state_entries()]

    def state_names(self) -> list[str]:
        return [self._name(*e) for e in self.state_entries()]

    def param_count(self) -> int:
        """Trainable parameters (what the tutorials' model summaries call trainable params)."""
        return int(sum(math.prod(s) for s in self.param_shapes()))

    @property
    def couples_batch(self) -> list[int]:
        """Indices of the layers that couple the samples of a batch in training mode (batch-size invariance of
        gradients does not hold there)."""
        return [i for i, layer in enumerate(self.layers) if layer.couples_batch]

    @property
    def random_layers(self) -> list[int]:
        return [i for i, layer in enumerate(self.layers) if layer.random]

    @property
    def n_outputs(self) -> int:
        return self.output_shape[0]

    def with_overrides(self, **changes) -> "ModelSpec":
        return replace(self, **changes)


def _initial(kind: str, shape: tuple[int, ...], init: Init, rng: np.random.Generator, fans_from_shape: bool):
    if kind == "ones":
        return np.ones(shape)
    if kind == "zeros":
        return np.zeros(shape)
    if kind == "normal":
        return rng.normal(0.0, init.scale, size=shape)
    if kind == "uniform":
        return rng.uniform(-init.scale, init.scale, size=shape)
    # glorot_uniform; a bias has no fan-in/fan-out, so its limit comes from its own size
    if fans_from_shape:
        receptive = math.prod(shape[:-2])
        fan_in, fan_out = shape[-2] * receptive, shape[-1] * receptive
    else:
        fan_in = fan_out = math.prod(shape)
    return rng.uniform(-math.sqrt(6.0 / (fan_in + fan_out)), math.sqrt(6.0 / (fan_in + fan_out)), size=shape)


def init_weights(spec: ModelSpec, seed: int, init: Init | None = None) -> list[np.ndarray]:
    """Canonical float64 initial trainable parameters, in ``spec.param_names()`` order and layout, from ``seed``.

    Each parameter's role picks its initializer (kernels: ``init.weights``, biases: ``init.biases``, gamma: ones, beta:
    zeros); random draws happen in parameter order, so adding a layer without random parameters moves no number."""
    init = init or spec.init
    if init.explicit:
        return [np.array(v, dtype=np.float64).reshape(s) for v, s in zip(init.explicit, spec.param_shapes())]
    rng = np.random.default_rng(seed)
    kinds = {"weights": init.weights, "biases": init.biases}
    return [np.asarray(_initial(kinds.get(p.init, p.init), p.shape, init, rng, p.role == "kernel"), dtype=np.float64)
            for _, _, p in spec.param_entries()]


def init_state(spec: ModelSpec) -> list[np.ndarray]:
    """Canonical float64 initial state (moving mean zeros, moving variance ones), in ``spec.state_names()`` order."""
    return [np.asarray(_initial(p.init, p.shape, spec.init, None, False), dtype=np.float64)
            for _, _, p in spec.state_entries()]


def dropout_masks(spec: ModelSpec, seed: int, step: int, batch_size: int) -> dict[int, np.ndarray]:
    """The dropout masks of training step ``step`` (updates applied before it) for a batch of ``batch_size``:
    layer index -> float64 array of shape ``(batch_size, *input shape)`` holding 0 (dropped) or ``1 / (1 - rate)``.

    Drawn from the run's seed alone, so every backend (and the oracle) multiplies by the same masks in aligned mode;
    ``gradients`` at step t uses step t's masks, the ones the update of step t uses."""
    shapes = spec.input_shapes()
    out = {}
    for i in spec.random_layers:
        layer = spec.layers[i]
        keep = np.random.default_rng([seed, 0xD0, step, i]).random((batch_size, *shapes[i])) >= layer.rate
        out[i] = keep * (1.0 / (1.0 - layer.rate))
    return out


# ------------------------------------------------------------------------------------------------------- JSON form
def _plain(obj: Any) -> dict:
    return {"type": type(obj).__name__, **dataclasses.asdict(obj)}


def spec_to_dict(spec: ModelSpec) -> dict:
    """The spec as plain JSON data (what raw results record and what crosses into a backend's worker); the derived
    ``param_names`` / ``state_names`` / ``param_count`` are informative and ignored by :func:`spec_from_dict`."""
    d = dataclasses.asdict(spec)
    d["layers"] = [_plain(layer) for layer in spec.layers]
    d["optimizer"] = _plain(spec.optimizer)
    d["loss"]["class_weights"] = list(spec.loss.class_weights)
    d["param_names"] = spec.param_names()
    d["state_names"] = spec.state_names()
    d["param_count"] = spec.param_count()
    return d


def _build(table: dict[str, type], what: str, d: dict):
    d = dict(d)
    kind = d.pop("type", None)
    if kind not in table:
        raise ValueError(f"unknown {what} type {kind!r}; the spec vocabulary has {', '.join(table)}")
    fields = {f.name: f for f in dataclasses.fields(table[kind])}
    unknown = set(d) - set(fields)
    if unknown:
        raise ValueError(f"{kind} has no field(s) {sorted(unknown)}; its fields: {', '.join(fields)}")
    return table[kind](**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def spec_from_dict(d: dict) -> ModelSpec:
    """Inverse of :func:`spec_to_dict` (``spec_from_dict(spec_to_dict(s)) == s``)."""
    d = {k: v for k, v in d.items() if k not in ("param_names", "state_names", "param_count")}
    d["layers"] = tuple(_build(LAYERS, "layer", layer) for layer in d["layers"])
    d["optimizer"] = _build(OPTIMIZERS, "optimizer", d["optimizer"])
    d["loss"], d["init"] = Loss(**d["loss"]), Init(**d["init"])
    d["clip"] = ClipNorm(**d["clip"]) if d.get("clip") else None
    d["schedule"] = StepDecay(**d["schedule"]) if d.get("schedule") else None
    for key in ("input_shape", "batch_sizes"):
        d[key] = tuple(d[key])
    return ModelSpec(**d)
