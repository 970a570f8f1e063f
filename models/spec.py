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
        _check_choice("activation", self.activation, ACTIVATIONS)

    def output_shape(self, in_shape):
        if len(in_shape) != 1:
            raise ValueError(f"Dense needs a flat input, got shape {in_shape}; add Flatten() before it")
        return (self.units,)

    def params(self, in_shape):
        kernel = ParamSpec.of("kernel", (in_shape[0], self.units))
        return (kernel, ParamSpec.of("bias", (self.units,))) if self.use_bias else (kernel,)


@dataclass(frozen=True)
class Conv2D(Layer):
    filters: int  # output channels
    kernel_size: tuple[int, int] = (3, 3)
    activation: str = "linear"
    padding: str = "valid"  # only "valid", stride 1
    use_bias: bool = True
    prefix = "conv"

    def __post_init__(self) -> None:
        _check_choice("activation", self.activation, ACTIVATIONS)
        _check_choice("padding", self.padding, ("valid",))
        object.__setattr__(self, "kernel_size", tuple(int(k) for k in self.kernel_size))

    def output_shape(self, in_shape):
        _needs_image(self, in_shape)
        kh, kw = self.kernel_size
        return (in_shape[0] - kh + 1, in_shape[1] - kw + 1, self.filters)

    def params(self, in_shape):
        kernel = ParamSpec.of("kernel", (*self.kernel_size, in_shape[2], self.filters))  # HWIO
        return (kernel, ParamSpec.of("bias", (self.filters,))) if self.use_bias else (kernel,)


@dataclass(frozen=True)
class MaxPool2D(Layer):
    pool_size: int = 2  # square window, stride == pool_size, 'valid' (trailing rows/cols dropped)
    prefix = "pool"

    def output_shape(self, in_shape):
        _needs_image(self, in_shape)
        p = self.pool_size
        return (in_shape[0] // p, in_shape[1] // p, in_shape[2])


@dataclass(frozen=True)
class Flatten(Layer):
    """NHWC -> (N, h*w*c) in (h, w, c) order."""

    prefix = "flatten"

    def output_shape(self, in_shape):
        return (int(np.prod(in_shape)),)


@dataclass(frozen=True)
class Activation(Layer):
    """An activation on its own (after a BatchNorm, say)."""

    activation: str
    prefix = "act"

    def __post_init__(self) -> None:
        _check_choice("activation", self.activation, ACTIVATIONS)

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
        for name in ("momentum", "epsilon"):
            v = getattr(self, name)
            if f32(v) != v:
                raise ValueError(f"BatchNorm {name}={v!r} is not exactly representable in float32; use "
                                 f"models.spec.f32({v!r})")
        if not 0.0 <= self.momentum < 1.0 or not self.epsilon > 0.0:
            raise ValueError(f"BatchNorm needs 0 <= momentum < 1 and epsilon > 0, got momentum={self.momentum!r}, "
                             f"epsilon={self.epsilon!r}")

    def output_shape(self, in_shape):
        return tuple(in_shape)

    def params(self, in_shape):
        c = (in_shape[-1],)
        return tuple(ParamSpec.of(role, c) for role in ("gamma", "beta", "moving_mean", "moving_variance"))


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
LAYERS: dict[str, type[Layer]] = {c.__name__: c for c in (Dense, Conv2D, MaxPool2D, Flatten, Activation, BatchNorm,
                                                           Dropout)}


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
OPTIMIZERS: dict[str, type] = {c.__name__: c for c in (SGD, Adam)}  # the optimizer vocabulary, like LAYERS


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
        self.check_batch_size(min(self.batch_sizes), "batch_sizes")

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
        """Activation shape (without batch) after each layer; raises ValueError on an impossible sequence."""
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
        return out

    @property
    def output_shape(self) -> tuple[int, ...]:
        return self.shapes()[-1]

    def input_shapes(self) -> list[tuple[int, ...]]:
        """The input shape (without batch) of each layer."""
        return [tuple(self.input_shape)] + self.shapes()[:-1]

    def entries(self) -> list[tuple[int, Layer, ParamSpec]]:
        """(layer index, layer, parameter) for every array of every layer, trainable and state, in layer order."""
        return [(i, layer, p) for i, (layer, s) in enumerate(zip(self.layers, self.input_shapes()))
                for p in layer.params(s)]

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
    for key in ("input_shape", "batch_sizes"):
        d[key] = tuple(d[key])
    return ModelSpec(**d)
