"""Framework-free model specs: frozen dataclasses of plain data.

A spec says *what* network to train (layers, loss, optimizer, initializer, data, batch sizes); every backend compiles
the same spec.  Backends read the fields of a spec and never its name.

Conventions that every backend follows (see ``shared/guides/numerics.md`` for the measurements behind them):

* Canonical weight layout: dense kernels ``(in, out)``, conv kernels HWIO, activations NHWC, flatten in (h, w, c)
  order.  Parameters are an ordered list ``[kernel_0, bias_0, kernel_1, bias_1, ...]`` named by :meth:`ModelSpec.param_names`.
* A classifier's last layer is linear (logits); its sigmoid / softmax is folded into the loss, which every backend
  computes from logits with the stable formula.  :attr:`Loss.prediction` says what predictions apply on top.
* Adam hyperparameters are exactly representable in float32 (see :func:`f32`), and the epsilon convention is written
  out: ``"eps_hat"`` (TF1, Keras) is ``w -= lr*sqrt(1-b2^t)/(1-b1^t) * m/(sqrt(v)+eps)``; ``"eps_v_hat"`` (torch, optax)
  is ``w -= lr * m_hat/(sqrt(v_hat)+eps)``.  Only ``eps_hat`` can be followed by all six backends (Keras cannot change
  its epsilon per step), so every built-in spec uses it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Union

import numpy as np

ACTIVATIONS = ("linear", "sigmoid", "relu")
LOSSES = ("sse", "binary_crossentropy", "softmax_crossentropy")
REDUCTIONS = ("sum", "mean")
ADAM_CONVENTIONS = ("eps_hat", "eps_v_hat")
INITIALIZERS = ("glorot_uniform", "normal", "uniform", "zeros")
DTYPES = ("float32", "float64")


def f32(x: float) -> float:
    """The Python float nearest to ``x`` that float32 represents exactly (``f32(0.999) == 0.9990000128746033``)."""
    return float(np.float32(x))


def _check_choice(what: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ValueError(f"{what} {value!r} is not supported; expected one of {', '.join(valid)}")


# ----------------------------------------------------------------------------------------------------------- layers
@dataclass(frozen=True)
class Dense:
    units: int  # output features
    activation: str = "linear"

    def __post_init__(self) -> None:
        _check_choice("activation", self.activation, ACTIVATIONS)


@dataclass(frozen=True)
class Conv2D:
    filters: int  # output channels
    kernel_size: tuple[int, int] = (3, 3)
    activation: str = "linear"
    padding: str = "valid"  # only "valid", stride 1

    def __post_init__(self) -> None:
        _check_choice("activation", self.activation, ACTIVATIONS)
        _check_choice("padding", self.padding, ("valid",))


@dataclass(frozen=True)
class MaxPool2D:
    pool_size: int = 2  # square window, stride == pool_size, 'valid' (trailing rows/cols dropped)


@dataclass(frozen=True)
class Flatten:
    """NHWC -> (N, h*w*c) in (h, w, c) order."""


Layer = Union[Dense, Conv2D, MaxPool2D, Flatten]


# ---------------------------------------------------------------------------------------------- loss and optimizers
@dataclass(frozen=True)
class Loss:
    kind: str  # "sse": sum of squared errors, no 1/2; "binary_crossentropy" / "softmax_crossentropy": from logits
    reduction: str  # over the batch: "sum" or "mean" (mean of per-sample losses)

    def __post_init__(self) -> None:
        _check_choice("loss", self.kind, LOSSES)
        _check_choice("reduction", self.reduction, REDUCTIONS)

    @property
    def prediction(self) -> str:
        """What turns the network output into a prediction: 'identity', 'sigmoid' or 'softmax'."""
        return {"sse": "identity", "binary_crossentropy": "sigmoid", "softmax_crossentropy": "softmax"}[self.kind]

    @property
    def integer_labels(self) -> bool:
        """softmax cross-entropy takes integer class labels of shape (N,); the others take targets shaped like the output."""
        return self.kind == "softmax_crossentropy"


@dataclass(frozen=True)
class SGD:
    lr: float  # w -= lr * grad


@dataclass(frozen=True)
class Adam:
    lr: float = f32(0.001)
    beta1: float = f32(0.9)
    beta2: float = f32(0.999)
    epsilon: float = f32(1e-7)
    convention: str = "eps_hat"  # see the module docstring

    def __post_init__(self) -> None:
        _check_choice("Adam epsilon convention", self.convention, ADAM_CONVENTIONS)
        for name in ("lr", "beta1", "beta2", "epsilon"):
            v = getattr(self, name)
            if f32(v) != v:
                raise ValueError(f"Adam {name}={v!r} is not exactly representable in float32; use models.spec.f32({v!r})")


Optimizer = Union[SGD, Adam]


@dataclass(frozen=True)
class Init:
    weights: str = "glorot_uniform"  # "glorot_uniform" | "normal" (mean 0, std=scale) | "uniform" (-scale, scale)
    biases: str = "zeros"  # same choices as weights
    scale: float = 1.0  # std for "normal", limit for "uniform"; unused by glorot / zeros

    def __post_init__(self) -> None:
        _check_choice("initializer", self.weights, INITIALIZERS)
        _check_choice("initializer", self.biases, INITIALIZERS)


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

    def __post_init__(self) -> None:
        _check_choice("dtype", self.dtype, DTYPES)
        if not self.layers:
            raise ValueError(f"model {self.name!r} has no layers")
        self.shapes()  # validates the layer sequence

    # -- shapes ----------------------------------------------------------------------------------------------------
    def shapes(self) -> list[tuple[int, ...]]:
        """Activation shape (without batch) after each layer; raises ValueError on an impossible sequence."""
        shape = tuple(self.input_shape)
        out = []
        for i, layer in enumerate(self.layers):
            if isinstance(layer, Dense):
                if len(shape) != 1:
                    raise ValueError(f"layer {i} (Dense) needs a flat input, got shape {shape}; add Flatten() before it")
                shape = (layer.units,)
            elif isinstance(layer, Conv2D):
                if len(shape) != 3:
                    raise ValueError(f"layer {i} (Conv2D) needs an (h, w, c) input, got shape {shape}")
                kh, kw = layer.kernel_size
                shape = (shape[0] - kh + 1, shape[1] - kw + 1, layer.filters)
            elif isinstance(layer, MaxPool2D):
                if len(shape) != 3:
                    raise ValueError(f"layer {i} (MaxPool2D) needs an (h, w, c) input, got shape {shape}")
                p = layer.pool_size
                shape = (shape[0] // p, shape[1] // p, shape[2])
            elif isinstance(layer, Flatten):
                shape = (int(np.prod(shape)),)
            else:
                raise ValueError(f"layer {i} has unknown type {type(layer).__name__}")
            if min(shape) <= 0:
                raise ValueError(f"layer {i} ({type(layer).__name__}) produces an empty shape {shape}")
            out.append(shape)
        return out

    @property
    def output_shape(self) -> tuple[int, ...]:
        return self.shapes()[-1]

    def param_layers(self) -> list[tuple[int, Layer, tuple[int, ...]]]:
        """(layer index, layer, input shape) for each layer with parameters."""
        result = []
        shape = tuple(self.input_shape)
        for i, (layer, out_shape) in enumerate(zip(self.layers, self.shapes())):
            if isinstance(layer, (Dense, Conv2D)):
                result.append((i, layer, shape))
            shape = out_shape
        return result

    def param_shapes(self) -> list[tuple[int, ...]]:
        shapes: list[tuple[int, ...]] = []
        for _, layer, in_shape in self.param_layers():
            if isinstance(layer, Dense):
                shapes += [(in_shape[0], layer.units), (layer.units,)]
            else:
                kh, kw = layer.kernel_size
                shapes += [(kh, kw, in_shape[2], layer.filters), (layer.filters,)]
        return shapes

    def param_names(self) -> list[str]:
        names = []
        for i, layer, _ in self.param_layers():
            kind = "dense" if isinstance(layer, Dense) else "conv"
            names += [f"{kind}{i}/kernel", f"{kind}{i}/bias"]
        return names

    def param_count(self) -> int:
        return int(sum(math.prod(s) for s in self.param_shapes()))

    @property
    def n_outputs(self) -> int:
        return self.output_shape[0]

    def with_overrides(self, **changes) -> "ModelSpec":
        return replace(self, **changes)


def init_weights(spec: ModelSpec, seed: int, init: Init | None = None) -> list[np.ndarray]:
    """Canonical float64 initial weights, in ``spec.param_names()`` order and layout, from ``seed``."""
    init = init or spec.init
    rng = np.random.default_rng(seed)
    weights = []
    for shape in spec.param_shapes():
        is_bias = len(shape) == 1
        kind = init.biases if is_bias else init.weights
        if kind == "zeros":
            w = np.zeros(shape)
        elif kind == "normal":
            w = rng.normal(0.0, init.scale, size=shape)
        elif kind == "uniform":
            w = rng.uniform(-init.scale, init.scale, size=shape)
        else:  # glorot_uniform; a bias has no fan-in/fan-out, so use zeros-like limit from its own size
            if is_bias:
                fan_in = fan_out = shape[0]
            else:
                receptive = math.prod(shape[:-2])
                fan_in, fan_out = shape[-2] * receptive, shape[-1] * receptive
            limit = math.sqrt(6.0 / (fan_in + fan_out))
            w = rng.uniform(-limit, limit, size=shape)
        weights.append(np.asarray(w, dtype=np.float64))
    return weights
