"""The contract every backend module fulfils, stated once.

A backend is one module (``backends/<name>.py``) that imports its framework only inside itself and exports:

* ``CAPABILITIES``: a :class:`Capabilities` (dtypes, devices, modes it can run; notes for the report);
* ``def probe() -> str``: import the framework and return its version string (raises ``ImportError`` if missing);
* ``def devices() -> list[str]``: the devices this process can use, a subset of ``("cpu", "cuda")``;
* ``class Model``: implements :class:`Model` below;
* ``LAYER_BUILDERS`` / ``OPTIMIZER_BUILDERS``: dicts from every type of the spec vocabulary (``models.spec.LAYERS``,
  ``models.spec.OPTIMIZERS``) to the backend's builder for it, or to a string saying why the backend cannot express
  it.  The backend looks every layer and the optimizer up through :func:`lookup`, so a type it lacks is a
  ``skipped: <backend> has no <Layer>`` row, never a silent drop (tests/test_conformance.py checks every backend).

Data crosses the edge as NumPy arrays in the canonical layout (dense ``(in, out)``, conv HWIO, inputs NHWC, flatten in
(h, w, c) order); a backend converts on the way in and back out, and says where in its module docstring.

Training mode and state: ``train_step`` and ``gradients`` run the network in training mode (BatchNorm on the batch's
statistics, dropout on), ``predict`` in inference mode (moving statistics, no dropout).  Non-trainable state
(``spec.state_names()``) starts at ``models.spec.init_state(spec)``, moves in ``train_step`` only, and is returned by
``get_state`` in canonical layout.  In aligned mode dropout multiplies by :meth:`ModelBase.dropout_masks` (drawn by the
harness from the run's seed and the step), so that every backend drops the same values.

Modes: ``"aligned"`` (default) reproduces the spec exactly, with the framework's own ops where a built-in cannot be
configured to match; ``"native"`` uses the framework's untouched defaults (Adam epsilon and its convention, loss
clipping), so that the harness can show how far those defaults move the numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from models.spec import DTYPES, ModelSpec, dropout_masks

MODES = ("aligned", "native")
DEVICES = ("cpu", "cuda")

# Every framework default that native mode applies, by key: a backend's native mode substitutes its framework's value
# for each of these where the framework has one (its "effective spec"), lists what that changed in
# ``info["native_differences"]`` (prose) and ``info["native_settings"]`` ({key: "the framework's API and value"}, only
# the keys that differ from the spec in this run), and with ``BuildOptions.extra["native_only"] = [keys]`` applies only
# those keys (the others stay aligned): how the hazards atlas (harness/hazards.py) measures one default at a time.
NATIVE_KEYS: dict[str, str] = {
    "adam_epsilon": "Adam / AdamW epsilon value",
    "adam_convention": "Adam / AdamW epsilon added to sqrt(v) (eps_hat) or sqrt(v_hat) (eps_v_hat)",
    "adam_one_minus_beta": "1 - beta computed from a Python double, then cast (Keras, float32 runs)",
    "lr_precision": "the learning rate or another hyperparameter as a Python float cast per update (TF1)",
    "matmul_precision": "the framework's default matmul / conv precision (TF32 on CUDA, XLA's default precision)",
    "loss_form": "the loss a framework user writes for the spec's loss (nn.MSELoss for sse, sigmoid + BCE on "
                 "probabilities, softmax + crossentropy on probabilities)",
    "mse_broadcast": "mean squared error with (N,) targets against an (N, 1) output (torch broadcasts to (N, N))",
    "sparse_cce_probabilities": "crossentropy on probabilities: Keras clips to [1e-7, 1 - 1e-7]; torch's "
                                "CrossEntropyLoss takes logits and applies softmax again",
    "class_weight_denominator": "class-weighted mean: divided by the batch size or by the sum of the batch's weights",
    "batchnorm_momentum": "BatchNorm momentum (and its convention)",
    "batchnorm_epsilon": "BatchNorm epsilon",
    "batchnorm_variance": "BatchNorm moving variance biased or Bessel-corrected",
    "dropout_rng": "dropout masks from the framework's own RNG",
    "conv_same_padding": "Conv2D 'same' padding at stride > 1 (TF pads the extra row bottom/right; torch's k//2 pads "
                         "both sides)",
    "avgpool_count_pad": "average pooling with padding: padded zeros counted in the divisor or not",
    "layernorm_epsilon": "LayerNorm epsilon",
    "leaky_relu_slope": "leaky_relu negative slope",
    "gelu_approximation": "gelu exact (erf) or tanh approximation",
    "momentum_form": "SGD momentum as an accumulator scaled by lr (torch, TF1, optax) or a velocity with lr inside "
                     "(Keras)",
    "rmsprop_rho": "RMSprop decay rho / alpha",
    "rmsprop_epsilon": "RMSprop epsilon value and whether it is inside the square root",
    "rmsprop_accumulator": "RMSprop initial accumulator (TF1: 1.0)",
    "adagrad_accumulator": "Adagrad initial accumulator",
    "adagrad_epsilon": "Adagrad epsilon value and whether it is inside the square root",
    "adamw_weight_decay": "AdamW default weight decay",
    "adamw_decay_form": "AdamW decay multiplied by the learning rate or not",
    "l2_regularization": "an L2 penalty written the framework's way (torch weight_decay = l on every parameter, "
                         "TF1 l * tf.nn.l2_loss = l * sum(w^2) / 2)",
    "clip_scope": "gradient clipping by global norm or per tensor",
    "clip_epsilon": "a small constant added to the norm when clipping (torch clip_grad_norm_: 1e-6)",
    "lr_schedule": "the step schedule through the framework's scheduler",
}


class Unsupported(Exception):
    """Raised by a backend for a configuration it cannot run; the harness turns it into a ``skipped:`` row."""


def lookup(table: dict, item, backend: str):
    """``table[type(item)]``: a backend's builder for a layer or optimizer of the spec.

    A type missing from the table, or mapped to a reason string, raises :class:`Unsupported` naming the backend and the
    type (``torch has no BatchNorm``): the one error every backend gives, so nothing is dropped silently."""
    name = type(item).__name__
    entry = table.get(type(item))
    if entry is None:
        raise Unsupported(f"{backend} has no {name}")
    if isinstance(entry, str):
        raise Unsupported(f"{backend} has no {name}: {entry}")
    return entry


@dataclass(frozen=True)
class Capabilities:
    dtypes: tuple[str, ...] = DTYPES
    devices: tuple[str, ...] = ("cpu",)
    modes: tuple[str, ...] = MODES
    notes: tuple[str, ...] = ()


@dataclass
class BuildOptions:
    dtype: str = "float64"  # "float32" | "float64": parameters, activations and optimizer state
    device: str = "cpu"  # "cpu" | "cuda"
    mode: str = "aligned"  # "aligned" | "native"
    threads: int | None = None  # intra-op threads; None leaves the framework's default
    fast: bool = False  # the backend's fast mode (jit_compile, CUDA graphs, scan) where it has one
    seed: int = 0  # the run's seed: the dropout masks of aligned mode are drawn from it
    extra: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Model(Protocol):
    """One network built from a spec and canonical initial weights, on one device, in one dtype."""

    info: dict[str, Any]  # facts for the report: how the optimizer/loss were implemented, tracing, float caveats

    def __init__(self, spec: ModelSpec, weights: list[np.ndarray], options: BuildOptions) -> None: ...

    def train_step(self, x: np.ndarray, y: np.ndarray) -> float:
        """One optimizer update on the batch; returns the loss at the weights *before* the update."""
        ...

    def train_steps(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        """``len(xs)`` updates on stacked batches ``xs[k]``; returns the per-step losses (a fused path may override)."""
        ...

    def gradients(self, x: np.ndarray, y: np.ndarray) -> tuple[float, list[np.ndarray]]:
        """Loss and the gradient of every parameter at the current weights (canonical layout); no update."""
        ...

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Network output with the spec's prediction function (identity, sigmoid or softmax) applied."""
        ...

    def get_weights(self) -> list[np.ndarray]:
        """Current parameters in canonical layout and order (``spec.param_names()``)."""
        ...

    def get_state(self) -> list[np.ndarray]:
        """Current non-trainable state in canonical layout and order (``spec.state_names()``); ``[]`` when none."""
        ...

    def sync(self) -> None:
        """Block until all queued device work is done (called before any clock is read)."""
        ...

    # Optional, used by the timing protocol when present:
    #   to_device(xs, ys) -> (xs, ys): the stacked batches as framework tensors on the model's device, accepted by
    #       train_steps, so that timed rounds do not count host-to-device conversion (data loading is not timed).
    #   gpu_peak_mb() -> float | None: the peak device memory, in MiB (2**20 bytes, see :func:`to_mib`), allocated by
    #       the framework in this process so far on the model's CUDA device: memory handed to arrays / tensors, not
    #       what a caching allocator reserved (cupy, which keeps no peak counter, reports its pool's size instead:
    #       ``numpy_scratch.Model.gpu_peak_mb``); the framework's own counter, so it covers every model of the
    #       process.  None when the model runs on the CPU, or where the framework keeps no such statistic (the row
    #       then has no GPU column).


def to_mib(nbytes: float | None) -> float | None:
    """Bytes in MiB (2**20 bytes), the unit of ``gpu_peak_mb``; None stays None."""
    return None if nbytes is None else float(nbytes) / 2**20


def xla_peak_mb(stats: dict | None) -> float | None:
    """``gpu_peak_mb`` from an XLA device's ``memory_stats()`` (JAX, Keras on JAX): its ``peak_bytes_in_use`` in MiB;
    None where the allocator keeps no such statistic (no stats, no key, or -1, a platform's "unavailable")."""
    peak = stats.get("peak_bytes_in_use") if stats else None
    return None if peak is None or peak < 0 else to_mib(peak)


class ModelBase:
    """Shared plumbing: argument checks and the default ``train_steps`` loop."""

    capabilities = Capabilities()

    def __init__(self, spec: ModelSpec, weights: list[np.ndarray], options: BuildOptions) -> None:
        shapes = spec.param_shapes()
        if len(weights) != len(shapes):
            raise ValueError(f"{spec.name}: expected {len(shapes)} weight arrays, got {len(weights)}")
        for name, w, s in zip(spec.param_names(), weights, shapes):
            if tuple(np.shape(w)) != tuple(s):
                raise ValueError(f"{spec.name}: weight {name} has shape {np.shape(w)}, expected {s}")
        if options.dtype not in self.capabilities.dtypes:
            raise Unsupported(f"dtype {options.dtype} not supported by this backend")
        if options.mode not in self.capabilities.modes:
            raise Unsupported(f"mode {options.mode} not supported by this backend")
        self.spec = spec
        self.options = options
        self.info: dict[str, Any] = {}
        only = options.extra.get("native_only")
        if only is not None:
            unknown = sorted(set(only) - set(NATIVE_KEYS))
            if unknown:
                raise ValueError(f"unknown native_only key(s) {unknown}; valid: {', '.join(NATIVE_KEYS)}")
        self._native_only = None if only is None else frozenset(only)

    def native(self, key: str) -> bool:
        """Whether this run applies the framework's default ``key`` (a :data:`NATIVE_KEYS` key): native mode, and
        ``key`` among ``BuildOptions.extra["native_only"]`` when that is given."""
        if key not in NATIVE_KEYS:
            raise KeyError(f"unknown native key {key!r}; add it to backends.base.NATIVE_KEYS")
        return self.options.mode == "native" and (self._native_only is None or key in self._native_only)

    def train_steps(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        return np.array([self.train_step(x, y) for x, y in zip(xs, ys)], dtype=np.float64)

    def get_state(self) -> list[np.ndarray]:
        if self.spec.state_entries():
            raise NotImplementedError(f"{type(self).__module__} keeps state but does not export it")
        return []

    def dropout_masks(self, step: int, batch_size: int, dtype=None) -> list[np.ndarray]:
        """The aligned dropout masks of training step ``step`` (updates applied before it), one per Dropout layer in
        layer order, in ``dtype`` (default: the run's): 0 where dropped, ``1 / (1 - rate)`` where kept."""
        dtype = np.dtype(dtype or self.options.dtype)
        masks = dropout_masks(self.spec, self.options.seed, step, batch_size)
        return [masks[i].astype(dtype) for i in self.spec.random_layers]

    def sync(self) -> None:
        pass


def one_minus_beta_diffs(used: dict, spec_opt, dtype: str) -> list[str]:
    """Keras 3's Adam computes ``1 - beta`` from its Python double, then casts: in float32 that differs from the
    spec's ``1 - f32(beta)`` (1 - 0.999: 1.3e-5 relative; numerics.md section 2)."""
    out = []
    if dtype != "float32":
        return out
    for name, value in used.items():
        spec_v = getattr(spec_opt, name.replace("_", ""))
        a, b = np.float32(1.0 - float(value)), np.float32(1.0) - np.float32(spec_v)
        if a != b:
            out.append(f"1 - Adam {name} from the Python double {float(value)!r}: {a:.9g} (spec, in float32: {b:.9g})")
    return out


def fmt(x: float) -> str:
    return f"{x:.7g}"


def value_diff(what: str, used: float, spec_value: float, dtype: str, note: str = "",
               nominal: float | None = None) -> str | None:
    """``"what USED (spec X)note"`` when the value a run computes with differs from the spec's, else None.

    ``used`` is the value in the precision the framework applies it; in a float32 run both round to float32 first.
    """
    if dtype == "float32":
        used, spec_value = float(np.float32(used)), float(np.float32(spec_value))
    if used == spec_value:
        return None
    a, b = fmt(used if nominal is None else nominal), fmt(spec_value)
    if a == b:
        a, b = repr(used), repr(spec_value)
    return f"{what} {a} (spec {b}){note}"
