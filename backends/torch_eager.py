"""PyTorch eager: an ``nn.Module`` built from the spec through the table :data:`LAYER_BUILDERS` (``nn.Linear``,
``nn.Conv2d``, ``nn.MaxPool2d``, ``nn.Flatten``, activations, BatchNorm, Dropout).

Layout: torch keeps ``Linear.weight`` as ``(out, in)``, conv weights as OIHW, images as NCHW and flattens in
(c, h, w) order.  All conversion happens at the edge, in one place (:func:`layout_plan` / :func:`state_plan` /
:func:`mask_plan`, :func:`to_torch_layout`, :func:`from_torch_layout`, :meth:`Model._x`), both ways, with shape
asserts; what an array is comes from its ``ParamSpec.role`` and its layer's builder, never from its shape:

* dense kernel ``(in, out)`` -> ``W.T``; conv kernel HWIO -> OIHW (``transpose(3, 2, 0, 1)``); biases as they are;
* inputs NHWC -> NCHW (only for image inputs); every (h, w, c) activation is NCHW inside the module;
* a Flatten of an (h, w, c) activation gives torch's (c, h, w) feature order, which lasts until the next Dense: that
  Dense's kernel rows, and the per-feature vectors (BatchNorm gamma / beta / moving statistics) and Dropout masks of
  the flat layers in between, are permuted from (h, w, c) to (c, h, w) order (and back in ``get_weights`` /
  ``gradients`` / ``get_state``).  Without it nothing raises: only the numbers differ;
* BatchNorm's vectors are ``(C,)`` in both layouts (channels of NCHW / features of a flat input); Dropout masks of an
  image are NHWC -> NCHW.

Aligned mode (the spec, literally):

* losses from logits with the stable formulas: sse = ``((out - y)**2).sum(-1)``; binary cross-entropy =
  ``F.binary_cross_entropy_with_logits(..., reduction="none").mean(-1)``; softmax cross-entropy = ``F.cross_entropy``
  on logits with int64 labels; then sum or mean over the batch per ``spec.loss.reduction``.
* SGD: built-in ``torch.optim.SGD`` (``p -= lr*g``: the spec).
* Adam, ``eps_v_hat`` convention: built-in ``torch.optim.Adam(params, lr, betas, eps=spec.epsilon)`` (torch adds eps to
  ``sqrt(v_hat)``: the spec's form; its bias corrections are Python doubles from the step count).
* Adam, ``eps_hat`` convention: written by hand with torch ops in the spec's order (``m += (g - m)*(1-b1)``,
  ``v += (g*g - v)*(1-b2)``, ``p -= (m*alpha)/(sqrt(v) + eps)`` with ``alpha = lr*sqrt(1-b2^t)/(1-b1^t)`` computed in
  double on the host and held in a 0-d device tensor): ``torch.optim.Adam`` with a constant eps cannot follow it.  The
  numerics guide's trick, ``torch.optim.Adam`` with ``eps = eps/sqrt(1-b2^t)`` set per step, is kept as
  ``extra={"adam": "torch_optim"}``; it meets the same tolerances but cannot be captured in a CUDA graph
  (``capturable=True`` bakes a Python-float eps into the graph).  ``extra={"adam": "manual"}`` forces the hand-written
  update for either convention.
* CUDA-graph fast mode keeps the hand-written Adam for ``eps_v_hat`` too: ``torch.optim.Adam(capturable=True)`` keeps
  its step count in a float32 tensor (``_get_scalar_dtype()``: float64 only when torch's default dtype is) and
  computes the bias corrections from it on the device, in float32 -- measured with the same branch on CPU
  (``differentiable=True``), Pima float64: 6.6e-8 scaled error after one step, 4.5e-5 over 20 steps (float32 runs:
  4.8e-5, against 3.0e-6 for the non-capturable built-in).
* ``info["optimizer"]`` says which ran: ``"built-in torch.optim.Adam"`` or ``"hand-written, spec convention (...)"``,
  then ``"; why"`` where there is more to say.
* BatchNorm: torch's own op normalises (``torch.batch_norm`` with no running statistics, training mode: the batch's
  mean and *biased* variance, the spec's epsilon; inference: the moving statistics).  The moving statistics are
  updated by hand from ``torch.var_mean(correction=0)`` as ``moving*momentum + stat*(1-momentum)`` (the spec's
  convention), storing ``var*n/(n-1)`` only when ``unbiased_moving_variance`` and n > 1: torch's own running-stats
  update always stores the unbiased variance, which the spec's default (biased) cannot configure.
* Dropout: multiplies by the harness's masks (:meth:`ModelBase.dropout_masks` of the step: updates applied so far),
  converted to torch's layout and handed to the module before each forward pass (static inputs of a CUDA graph).
* ``gradients`` runs training mode and leaves the BatchNorm state as it found it (buffers restored).
* CUDA: TF32 off for matmuls and cuDNN convolutions (torch's default lets cuDNN use TF32).
* Max-pooling routes the gradient to the first maximum of each window on CPU and CUDA, like the NumPy oracle.

Native mode: built-in ``torch.optim.Adam`` with its defaults (eps 1e-8 added to ``sqrt(v_hat)``), the losses a torch user
writes (``nn.Sigmoid`` + ``nn.BCELoss`` on probabilities, which clamps log at -100; ``nn.CrossEntropyLoss``;
``nn.MSELoss``), ``nn.BatchNorm1d/2d()`` with torch's defaults (momentum 0.1 in torch's convention = 0.9 in the spec's,
eps 1e-5, unbiased running variance: ``torch/nn/modules/batchnorm.py``, ``_BatchNorm.__init__`` and the BatchNorm1d
docstring; measured in tests/test_vocab_torch.py), ``nn.Dropout(rate)`` on torch's RNG (seeded with the run's seed),
TF32 left at torch's defaults; ``info["native_differences"]`` lists what differs from the spec.

Fast mode: on CUDA the whole step (forward, loss, backward, update, BatchNorm state, dropout masks as static inputs)
is captured once per batch shape in a CUDA graph and replayed; on CPU it is a no-op (noted in ``info``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.spec import (
    SGD,
    Activation,
    Adam,
    BatchNorm,
    Conv2D,
    Dense,
    Dropout,
    Flatten,
    Layer,
    MaxPool2D,
    ModelSpec,
    init_state,
)

from .base import BuildOptions, Capabilities, ModelBase, Unsupported, lookup, value_diff

BACKEND = "torch"

CAPABILITIES = Capabilities(
    devices=("cpu", "cuda"),
    notes=("canonical weights converted at the edge: Linear W.T, conv HWIO->OIHW, NHWC->NCHW, flatten rows (h,w,c)"
           "->(c,h,w) (also BatchNorm vectors and dropout masks of the flat layers after a Flatten)",
           "aligned Adam: built-in torch.optim.Adam for eps_v_hat, hand-written for eps_hat (and for both "
           "in CUDA-graph fast mode)", "aligned BatchNorm: torch.batch_norm on batch statistics, moving statistics "
           "updated by hand (spec momentum, biased or unbiased)", "aligned Dropout: the harness's masks",
           "fast mode = CUDA graph replay"),
)

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def probe() -> str:
    return torch.__version__


def devices() -> list[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


# ------------------------------------------------------------------------------------------------ the layer table
_ACTS = {"linear": None, "sigmoid": nn.Sigmoid, "relu": nn.ReLU}


def _act(kind: str) -> list[nn.Module]:
    return [] if _ACTS[kind] is None else [_ACTS[kind]()]


class AlignedBatchNorm(nn.Module):
    """The spec's BatchNorm: ``torch.batch_norm`` normalises (training: the batch's mean and biased variance, no
    running statistics handed to it; inference: the moving statistics); the moving statistics move by hand in the
    spec's momentum convention.  Parameters ``weight`` (gamma) then ``bias`` (beta), buffers ``running_mean`` /
    ``running_var``, all ``(C,)``.  Channels: dim 1 of an NCHW input, the last dim otherwise."""

    def __init__(self, layer: BatchNorm, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))
        self.eps = float(layer.epsilon)
        self.momentum = float(layer.momentum)
        self.unbiased = bool(layer.unbiased_moving_variance)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x if x.dim() == 4 else x.reshape(-1, shape[-1])  # NCHW, or (values, channels)
        cudnn = torch.backends.cudnn.enabled
        if not self.training:
            return torch.batch_norm(x2, self.weight, self.bias, self.running_mean, self.running_var, False, 0.0,
                                    self.eps, cudnn).reshape(shape)
        out = torch.batch_norm(x2, self.weight, self.bias, None, None, True, 0.0, self.eps, cudnn)
        with torch.no_grad():
            dims = (0, 2, 3) if x2.dim() == 4 else (0,)
            var, mean = torch.var_mean(x2.detach(), dim=dims, correction=0)
            n = x2.numel() // x2.shape[1]
            if self.unbiased and n > 1:
                var = var * (n / (n - 1))
            # the spec's moving = moving*momentum + stat*(1 - momentum), both factors rounded to the run's dtype
            dt = np.float32 if x.dtype == torch.float32 else np.float64
            mom, rest = float(dt(self.momentum)), float(dt(1) - dt(self.momentum))
            self.running_mean.copy_(self.running_mean * mom + mean * rest)
            self.running_var.copy_(self.running_var * mom + var * rest)
        return out.reshape(shape)


class MaskedDropout(nn.Module):
    """Aligned dropout: training mode multiplies by ``self.mask`` (set by the model before each forward pass, in torch
    layout: 0 or ``1/(1-rate)``); inference mode is the identity."""

    def __init__(self) -> None:
        super().__init__()
        self.mask: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        if self.mask is None or self.mask.shape != x.shape:
            raise RuntimeError(f"MaskedDropout: no mask of shape {tuple(x.shape)} was set for this forward pass")
        return x * self.mask


def _dense(layer: Dense, shape, native: bool) -> list[nn.Module]:
    return [nn.Linear(shape[0], layer.units, bias=layer.use_bias)] + _act(layer.activation)


def _conv(layer: Conv2D, shape, native: bool) -> list[nn.Module]:
    return [nn.Conv2d(shape[2], layer.filters, tuple(layer.kernel_size), stride=1, padding=0,
                      bias=layer.use_bias)] + _act(layer.activation)


def _pool(layer: MaxPool2D, shape, native: bool) -> list[nn.Module]:
    return [nn.MaxPool2d(layer.pool_size, stride=layer.pool_size)]


def _flatten(layer: Flatten, shape, native: bool) -> list[nn.Module]:
    return [nn.Flatten()]


def _activation(layer: Activation, shape, native: bool) -> list[nn.Module]:
    return _act(layer.activation) or [nn.Identity()]


def _batchnorm(layer: BatchNorm, shape, native: bool) -> list[nn.Module]:
    if not native:
        return [AlignedBatchNorm(layer, shape[-1])]
    if len(shape) == 3:
        return [nn.BatchNorm2d(shape[-1])]  # torch's defaults, untouched
    if len(shape) == 1:
        return [nn.BatchNorm1d(shape[-1])]
    raise Unsupported(f"{BACKEND} native BatchNorm on a per-sample shape {shape}: nn.BatchNorm1d would normalise "
                      "dim 1, not the last axis")


def _batchnorm_native_diffs(layer: BatchNorm, dtype: str) -> list[str]:
    """What torch's ``nn.BatchNorm*d()`` defaults do differently from this layer (read from a default module)."""
    bn = nn.BatchNorm1d(1)
    out = [value_diff("BatchNorm momentum", 1.0 - bn.momentum, layer.momentum, dtype,
                      f" (torch's momentum={bn.momentum:g} is the weight of the new value)"),
           value_diff("BatchNorm epsilon", bn.eps, layer.epsilon, dtype)]
    if not layer.unbiased_moving_variance:
        out.append("BatchNorm running variance: torch stores the unbiased batch variance (spec: biased)")
    return [d for d in out if d]


def _dropout(layer: Dropout, shape, native: bool) -> list[nn.Module]:
    return [nn.Dropout(layer.rate)] if native else [MaskedDropout()]


def _dropout_native_diffs(layer: Dropout, dtype: str) -> list[str]:
    return ["Dropout masks from torch's RNG: trajectories not comparable"] if layer.rate > 0 else []


def _bn_state(module: nn.Module) -> list[torch.Tensor]:
    return [module.running_mean, module.running_var]


@dataclass(frozen=True)
class LayerBuilder:
    """How one layer type becomes torch modules, and what its arrays and features are in torch's layout.

    ``build(layer, input shape, native)`` gives the layer's modules; the first holds its parameters in the spec's
    order.  ``kernel``: the layout of its "kernel" role ("dense": ``(out, in)``; "conv": OIHW).  ``flat``: what it does
    to the order of a flat activation's features: "keep" (elementwise), "flatten" (a Flatten of (h, w, c) gives
    torch's (c, h, w) order), "new" (fresh features, in the same order in both layouts).  ``state``: first module ->
    its state tensors in the spec's order.  ``masked``: aligned mode feeds it the harness's dropout masks.
    ``native_diffs(layer, dtype)``: how torch's defaults differ from the layer's spec."""

    build: Callable
    kernel: str | None = None
    flat: str = "keep"
    state: Callable | None = None
    masked: bool = False
    native_diffs: Callable | None = None


LAYER_BUILDERS: dict[type, LayerBuilder | str] = {
    Dense: LayerBuilder(_dense, kernel="dense", flat="new"),
    Conv2D: LayerBuilder(_conv, kernel="conv", flat="new"),
    MaxPool2D: LayerBuilder(_pool, flat="new"),
    Flatten: LayerBuilder(_flatten, flat="flatten"),
    Activation: LayerBuilder(_activation),
    BatchNorm: LayerBuilder(_batchnorm, state=_bn_state, native_diffs=_batchnorm_native_diffs),
    Dropout: LayerBuilder(_dropout, masked=True, native_diffs=_dropout_native_diffs),
}


# --------------------------------------------------------------------------------------- layout: the one edge
@dataclass(frozen=True)
class ParamLayout:
    """How one canonical array (parameter or state) maps onto its torch tensor."""

    name: str
    kind: str  # "dense" | "conv" (kernels) | "bias" | "vector" (per-feature: BatchNorm gamma/beta/moving statistics)
    canonical: tuple[int, ...]  # canonical shape
    torch: tuple[int, ...]  # torch shape
    rows: tuple[int, ...] | None = None  # flat features in torch's order: canonical index of each torch feature


def flatten_rows(h: int, w: int, c: int) -> np.ndarray:
    """For torch's (c, h, w) flatten order, the index of each feature in the canonical (h, w, c) order."""
    return np.arange(h * w * c).reshape(h, w, c).transpose(2, 0, 1).ravel()


@dataclass(frozen=True)
class _LayerPlace:
    index: int
    layer: Layer
    builder: LayerBuilder
    in_shape: tuple[int, ...]
    rows: tuple[int, ...] | None  # a flat input's features in torch's order (None: the same order as canonical)


def _walk(spec: ModelSpec) -> list[_LayerPlace]:
    """Every layer with its builder (looked up in :data:`LAYER_BUILDERS`: an unknown type raises Unsupported here),
    input shape and the torch order of its flat input's features."""
    out = []
    shape, rows = tuple(spec.input_shape), None
    for i, (layer, out_shape) in enumerate(zip(spec.layers, spec.shapes())):
        b = lookup(LAYER_BUILDERS, layer, BACKEND)
        out.append(_LayerPlace(i, layer, b, shape, rows if len(shape) == 1 else None))
        if b.flat == "flatten":
            rows = tuple(int(r) for r in flatten_rows(*shape)) if len(shape) == 3 else rows if len(shape) == 1 else None
        elif b.flat == "new":
            rows = None
        shape = out_shape
    return out


def _entry_layout(place: _LayerPlace, name: str, p) -> ParamLayout:
    if p.role == "kernel":
        if place.builder.kernel == "dense":
            return ParamLayout(name, "dense", p.shape, (p.shape[1], p.shape[0]), place.rows)
        if place.builder.kernel == "conv":
            kh, kw, c, f = p.shape
            return ParamLayout(name, "conv", p.shape, (f, c, kh, kw))
        raise Unsupported(f"{BACKEND}: {type(place.layer).__name__} has a kernel of no known layout")
    if p.role == "bias":  # on the layer's output features, which are new: the same order in both layouts
        return ParamLayout(name, "bias", p.shape, p.shape)
    # gamma, beta, moving statistics: one value per feature of the layer's input (and output)
    return ParamLayout(name, "vector", p.shape, p.shape, place.rows)


def _plan(spec: ModelSpec, entries, names) -> list[ParamLayout]:
    places = _walk(spec)
    return [_entry_layout(places[i], name, p) for (i, _, p), name in zip(entries, names, strict=True)]


def layout_plan(spec: ModelSpec) -> list[ParamLayout]:
    """The conversion of every trainable parameter, in ``spec.param_names()`` order."""
    return _plan(spec, spec.param_entries(), spec.param_names())


def state_plan(spec: ModelSpec) -> list[ParamLayout]:
    """The conversion of every state array, in ``spec.state_names()`` order."""
    return _plan(spec, spec.state_entries(), spec.state_names())


def mask_plan(spec: ModelSpec) -> list[str | tuple[int, ...] | None]:
    """Per Dropout layer (``spec.random_layers`` order): how its canonical mask becomes torch's: "nchw" (an image
    mask, NHWC -> NCHW), the torch order of a flat input's features, or None (as it is)."""
    return [("nchw" if len(p.in_shape) == 3 else p.rows) for p in _walk(spec) if p.builder.masked]


def to_torch_layout(plan: list[ParamLayout], weights: list[np.ndarray]) -> list[np.ndarray]:
    """Canonical arrays -> arrays shaped and ordered as the torch tensors."""
    out = []
    for p, w in zip(plan, weights, strict=True):
        w = np.asarray(w)
        assert w.shape == p.canonical, f"{p.name}: canonical shape {w.shape}, expected {p.canonical}"
        if p.rows is not None:
            w = w[list(p.rows)]  # features (h,w,c) -> (c,h,w)
        if p.kind == "dense":
            t = w.T  # (in,out) -> (out,in)
        elif p.kind == "conv":
            t = w.transpose(3, 2, 0, 1)  # HWIO -> OIHW
        else:
            t = w
        assert t.shape == p.torch, f"{p.name}: torch shape {t.shape}, expected {p.torch}"
        out.append(np.ascontiguousarray(t))
    return out


def from_torch_layout(plan: list[ParamLayout], arrays: list[np.ndarray]) -> list[np.ndarray]:
    """Arrays shaped as the torch tensors -> canonical layout (the exact inverse of :func:`to_torch_layout`)."""
    out = []
    for p, t in zip(plan, arrays, strict=True):
        t = np.asarray(t)
        assert t.shape == p.torch, f"{p.name}: torch shape {t.shape}, expected {p.torch}"
        if p.kind == "dense":
            w = t.T
        elif p.kind == "conv":
            w = t.transpose(2, 3, 1, 0)  # OIHW -> HWIO
        else:
            w = t
        if p.rows is not None:
            inv = np.empty(len(p.rows), dtype=np.intp)
            inv[list(p.rows)] = np.arange(len(p.rows))
            w = w[inv]
        assert w.shape == p.canonical, f"{p.name}: canonical shape {w.shape}, expected {p.canonical}"
        out.append(np.ascontiguousarray(w))
    return out


def mask_to_torch(how, mask: np.ndarray) -> np.ndarray:
    """One canonical dropout mask ``(B, *input shape)`` in torch's layout (see :func:`mask_plan`)."""
    if how == "nchw":
        return np.ascontiguousarray(mask.transpose(0, 3, 1, 2))
    if how is not None:
        return np.ascontiguousarray(mask[:, list(how)])
    return mask


# ------------------------------------------------------------------------------------------------- the network
def build_layers(spec: ModelSpec, native: bool = False) -> list[tuple[_LayerPlace, list[nn.Module]]]:
    """Each layer with its modules (built by its :data:`LAYER_BUILDERS` entry)."""
    return [(p, p.builder.build(p.layer, p.in_shape, native)) for p in _walk(spec)]


def build_module(spec: ModelSpec, final_sigmoid: bool = False, native: bool = False) -> nn.Sequential:
    """The spec as an ``nn.Sequential``; parameters come out in ``spec.param_names()`` order (weight, bias, ...)."""
    mods = [m for _, ms in build_layers(spec, native) for m in ms]
    if final_sigmoid:
        mods.append(nn.Sigmoid())
    return nn.Sequential(*mods)


def aligned_loss(spec: ModelSpec):
    """The spec's loss from the network output (logits for the cross-entropies)."""
    kind, reduction = spec.loss.kind, spec.loss.reduction

    def loss(out, y):
        if kind == "sse":
            d = out - y
            per_sample = (d * d).sum(-1)
        elif kind == "binary_crossentropy":
            per_sample = F.binary_cross_entropy_with_logits(out, y, reduction="none").mean(-1)
        else:
            per_sample = F.cross_entropy(out, y, reduction="none")
        return per_sample.mean() if reduction == "mean" else per_sample.sum()

    return loss


def native_loss(spec: ModelSpec) -> tuple[nn.Module, list[str]]:
    """The loss module a torch user writes for this spec, and how it differs from the spec."""
    kind, reduction, k = spec.loss.kind, spec.loss.reduction, spec.n_outputs
    diffs = []
    if kind == "sse":
        if reduction == "sum":
            fn = nn.MSELoss(reduction="sum")
        else:
            fn = nn.MSELoss()
            if k > 1:
                diffs.append(f"sse: nn.MSELoss() averages over the {k} outputs too (spec: sum over outputs)")
    elif kind == "binary_crossentropy":
        fn = nn.BCELoss(reduction=reduction)
        diffs.append("binary cross-entropy: nn.Sigmoid + nn.BCELoss on probabilities (log clamped at -100, gradient "
                     "through a saturating sigmoid); spec: stable formula from logits")
        if reduction == "sum" and k > 1:
            diffs.append(f"nn.BCELoss(reduction='sum') sums over the {k} outputs (spec: mean over outputs)")
    else:
        fn = nn.CrossEntropyLoss(reduction=reduction)  # from logits, log_softmax inside: same as the spec
    return fn, diffs


# ---------------------------------------------------------------------------------------------- the optimizer table
# optimizer type -> builder(model, opt, info, diffs): sets model.torch_opt / model.adam_impl and info["optimizer"]
def _build_sgd(model: "Model", opt: SGD, info: dict, diffs: list[str]) -> None:
    model.torch_opt = torch.optim.SGD(model.params, lr=opt.lr)
    info["optimizer"] = "built-in torch.optim.SGD"


def _build_adam(model: "Model", opt: Adam, info: dict, diffs: list[str]) -> None:
    if model.native:
        model.torch_opt = torch.optim.Adam(model.params, lr=opt.lr, betas=(opt.beta1, opt.beta2),
                                           capturable=model.fast_graph)
        eps0 = model.torch_opt.param_groups[0]["eps"]
        info["optimizer"] = f"built-in torch.optim.Adam; torch's defaults (eps={eps0:g}, eps_v_hat)"
        if not (opt.convention == "eps_v_hat" and opt.epsilon == eps0):
            diffs.append(f"Adam: torch.optim.Adam default eps={eps0:g} added to sqrt(v_hat) (spec: "
                         f"eps={opt.epsilon:g}, {opt.convention} convention)")
        return
    model.adam_impl, info["optimizer"] = model._adam_choice(opt, model.options.extra.get("adam", "auto"))
    if model.adam_impl == "torch_optim":
        model.torch_opt = torch.optim.Adam(model.params, lr=opt.lr, betas=(opt.beta1, opt.beta2), eps=opt.epsilon)
    else:
        model.m = [torch.zeros_like(p) for p in model.params]
        model.v = [torch.zeros_like(p) for p in model.params]
        model._b1c = 1.0 - opt.beta1  # exact: the betas are float32-representable and in [0.5, 1]
        model._b2c = 1.0 - opt.beta2


OPTIMIZER_BUILDERS: dict[type, Callable | str] = {SGD: _build_sgd, Adam: _build_adam}


# --------------------------------------------------------------------------------------------------- the model
class Model(ModelBase):
    capabilities = CAPABILITIES

    def __init__(self, spec: ModelSpec, weights: list[np.ndarray], options: BuildOptions) -> None:
        super().__init__(spec, weights, options)
        # every layer and the optimizer looked up first: an unknown type is Unsupported before any work
        places = _walk(spec)
        build_opt = lookup(OPTIMIZER_BUILDERS, spec.optimizer, BACKEND)
        if options.device == "cuda" and not torch.cuda.is_available():
            raise Unsupported("no CUDA device visible to torch")
        if options.device not in ("cpu", "cuda"):
            raise Unsupported(f"device {options.device} not supported (cpu, cuda)")
        self.native = options.mode == "native"
        self.dev = torch.device(options.device)
        self.dtype = _DTYPES[options.dtype]
        self.np_dtype = np.dtype(options.dtype)
        if options.threads:
            torch.set_num_threads(int(options.threads))
        info: dict = {"threads": torch.get_num_threads()}
        diffs: list[str] = []
        if self.dev.type == "cuda":
            if self.native:  # torch's defaults untouched (cuDNN convolutions may use TF32)
                diffs.append(f"TF32 left at torch defaults (matmul {torch.backends.cuda.matmul.allow_tf32}, cuDNN "
                             f"convolutions {torch.backends.cudnn.allow_tf32})")
            else:  # exact float32 products (process-wide: one backend per process)
                torch.backends.cuda.matmul.allow_tf32 = False
                torch.backends.cudnn.allow_tf32 = False
            info["tf32"] = {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32}

        # -- the network, with the canonical weights and initial state converted at the edge
        self.plan = layout_plan(spec)
        self.splan = state_plan(spec)
        self.mplan = mask_plan(spec)
        self.native_sigmoid = self.native and spec.loss.kind == "binary_crossentropy"
        layers = build_layers(spec, self.native)
        mods = [m for _, ms in layers for m in ms] + ([nn.Sigmoid()] if self.native_sigmoid else [])
        self.net = nn.Sequential(*mods).to(device=self.dev, dtype=self.dtype)
        self.params = list(self.net.parameters())
        self.state = [t for p, ms in layers if p.builder.state is not None for t in p.builder.state(ms[0])]
        self.masked = [ms[0] for p, ms in layers if p.builder.masked] if not self.native else []
        with torch.no_grad():
            for ts, arrays, plan in ((self.params, to_torch_layout(self.plan, weights), self.plan),
                                     (self.state, to_torch_layout(self.splan, init_state(spec)), self.splan)):
                for p, a, lay in zip(ts, arrays, plan, strict=True):
                    assert tuple(p.shape) == lay.torch, f"{lay.name}: module tensor {tuple(p.shape)} vs {lay.torch}"
                    p.copy_(torch.from_numpy(np.asarray(a, dtype=self.np_dtype)))
        if self.native:
            for p in places:
                if p.builder.native_diffs is not None:
                    diffs += p.builder.native_diffs(p.layer, options.dtype)
            if spec.random_layers:  # native dropout draws from torch's global RNG: seeded for a reproducible run
                torch.manual_seed(int(options.seed))
        if spec.state_entries():
            info["batchnorm"] = ("nn.BatchNorm1d/2d, torch's defaults" if self.native else
                                 "torch.batch_norm on the batch's statistics (biased variance); moving statistics "
                                 "updated by hand in the spec's convention")
        if spec.random_layers:
            info["dropout"] = (f"nn.Dropout, torch's RNG seeded with {int(options.seed)}" if self.native else
                               "the harness's masks (step, seed)")

        # -- loss
        if self.native:
            self.loss_fn, loss_diffs = native_loss(spec)
            diffs += loss_diffs
            info["loss"] = type(self.loss_fn).__name__ + (" after nn.Sigmoid" if self.native_sigmoid else "")
        else:
            self.loss_fn = aligned_loss(spec)
            info["loss"] = f"{spec.loss.kind} from logits (stable), {spec.loss.reduction} over the batch"

        # -- optimizer
        self.t = 0
        self.fast_graph = bool(options.fast and self.dev.type == "cuda")
        # Adam's per-step scalars, set on the host before each step (or graph replay): eps_hat: alpha_t =
        # lr*sqrt(1-b2^t)/(1-b1^t) in _alpha; eps_v_hat: lr/(1-b1^t) in _alpha and 1/(1-b2^t) in _c2
        self._alpha = torch.zeros((), dtype=self.dtype, device=self.dev)
        self._c2 = torch.zeros((), dtype=self.dtype, device=self.dev)
        self.adam_impl = None  # "torch_optim" | "manual" for the aligned Adam; None: no per-step scalars
        self.torch_opt = None
        build_opt(self, spec.optimizer, info, diffs)
        if self.native:
            diffs = list(dict.fromkeys(diffs))  # one line per difference, however many layers share it
            info["native_differences"] = diffs or [f"nothing differs: {info['optimizer']} and {info['loss']} compute "
                                                   "what the spec says"]
        info["fast"] = ("CUDA graph replay of the whole step, one graph per batch shape" if self.fast_graph
                        else "no-op on CPU" if options.fast else False)
        # the settings that decide bit-reproducibility (numerics.md section 7), recorded with every row
        info["deterministic_algorithms"] = torch.are_deterministic_algorithms_enabled()
        info["num_threads"] = torch.get_num_threads()
        self._graphs: dict = {}
        self.info = info

    def _adam_choice(self, opt: Adam, requested: str) -> tuple[str, str]:
        """(implementation, ``info["optimizer"]``) of the aligned Adam: ``"torch_optim"`` or ``"manual"``.

        ``requested`` (``extra["adam"]``): ``"auto"`` (the built-in wherever it follows the spec exactly), ``"manual"``
        or ``"torch_optim"`` (for eps_hat, the per-step eps trick)."""
        if requested not in ("auto", "manual", "torch_optim"):
            raise ValueError(f"extra['adam'] must be 'auto', 'manual' or 'torch_optim', got {requested!r}")
        hand = f"hand-written, spec convention ({opt.convention})"
        if requested == "manual":
            return "manual", hand + "; extra['adam']='manual'"
        if opt.convention == "eps_hat":
            if requested == "auto":
                return "manual", hand + "; torch.optim.Adam adds a constant eps to sqrt(v_hat) (eps_v_hat)"
            if self.fast_graph:
                raise Unsupported("extra['adam']='torch_optim' sets eps per step: it cannot be captured in a CUDA "
                                  "graph; use the default hand-written Adam with --fast")
            return "torch_optim", "built-in torch.optim.Adam; eps_hat via eps = eps/sqrt(1-b2^t) set per step"
        if self.fast_graph:  # eps_v_hat
            if requested == "torch_optim":
                raise Unsupported("extra['adam']='torch_optim' with --fast on CUDA needs capturable=True, whose "
                                  "float32 step count gives float32 bias corrections; use the default with --fast")
            return "manual", hand + ("; CUDA-graph capture needs torch.optim.Adam(capturable=True), whose bias "
                                     "corrections come from a float32 step tensor on the device")
        return "torch_optim", "built-in torch.optim.Adam"

    # -- the edge for data ---------------------------------------------------------------------------------------
    def _x(self, x) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(x, dtype=self.np_dtype)).to(self.dev)
        if t.dim() == 4:
            t = t.permute(0, 3, 1, 2).contiguous()  # NHWC -> NCHW
        return t

    def _y(self, y) -> torch.Tensor:
        if self.spec.loss.integer_labels:
            return torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64)).to(self.dev)
        return torch.from_numpy(np.ascontiguousarray(y, dtype=self.np_dtype)).to(self.dev)

    def _canonical(self, tensors, plan=None) -> list[np.ndarray]:
        # copy: on CPU .numpy() shares memory with the live parameter, which the next step changes in place
        return from_torch_layout(self.plan if plan is None else plan,
                                 [t.detach().cpu().numpy().copy() for t in tensors])

    def _masks(self, step: int, batch_size: int) -> list[torch.Tensor]:
        """The harness's dropout masks of training step ``step`` in torch's layout, on the device (aligned mode)."""
        if not self.masked:
            return []
        return [torch.from_numpy(mask_to_torch(how, m)).to(self.dev)
                for how, m in zip(self.mplan, self.dropout_masks(step, batch_size, self.np_dtype), strict=True)]

    def _set_masks(self, masks: list[torch.Tensor]) -> None:
        for mod, m in zip(self.masked, masks, strict=True):
            mod.mask = m

    # -- one step ------------------------------------------------------------------------------------------------
    def _loss_grads(self, x, y):
        self.net.train()
        loss = self.loss_fn(self.net(x), y)
        return loss, torch.autograd.grad(loss, self.params)

    def _set_step_scalars(self, t: int) -> None:
        """Host-side per-step scalars, computed in double, before the step (or graph replay) that uses them."""
        if self.adam_impl is None:  # SGD, native Adam: nothing per step
            return
        opt = self.spec.optimizer
        b1t, b2t = opt.beta1**t, opt.beta2**t
        if self.adam_impl == "torch_optim":
            if opt.convention == "eps_hat":  # the per-step eps trick; eps_v_hat keeps the constructor's eps
                for g in self.torch_opt.param_groups:
                    g["eps"] = opt.epsilon / math.sqrt(1.0 - b2t)
        elif opt.convention == "eps_hat":
            self._alpha.fill_(opt.lr * math.sqrt(1.0 - b2t) / (1.0 - b1t))
        else:
            self._alpha.fill_(opt.lr / (1.0 - b1t))
            self._c2.fill_(1.0 / (1.0 - b2t))

    @torch.no_grad()
    def _apply(self, grads) -> None:
        if self.torch_opt is not None:
            for p, g in zip(self.params, grads):
                p.grad = g
            self.torch_opt.step()
            return
        opt = self.spec.optimizer
        for p, m, v, g in zip(self.params, self.m, self.v, grads):
            m.lerp_(g, self._b1c)  # m += (g - m) * (1 - b1): lerp computes exactly this for weights < 0.5
            v.lerp_(g * g, self._b2c)  # v += (g*g - v) * (1 - b2)
            if opt.convention == "eps_hat":
                p.sub_((m * self._alpha).div_(v.sqrt().add_(opt.epsilon)))
            else:  # eps_v_hat (extra['adam']='manual', or CUDA-graph fast mode): p -= lr*m_hat / (sqrt(v_hat) + eps)
                p.sub_((m * self._alpha).div_((v * self._c2).sqrt_().add_(opt.epsilon)))

    def _step_body(self, x, y) -> torch.Tensor:
        loss, grads = self._loss_grads(x, y)
        self._apply(grads)
        return loss.detach()

    def _step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One update; returns the loss before it as a 0-d device tensor (no host sync)."""
        masks = self._masks(self.t, x.shape[0])  # step t: the updates applied before this one
        self.t += 1
        self._set_step_scalars(self.t)
        if self.fast_graph:
            return self._replay(x, y, masks)
        self._set_masks(masks)
        return self._step_body(x, y)

    def train_step(self, x, y) -> float:
        return float(self._step(self._x(x), self._y(y)))

    def to_device(self, xs, ys):
        """The stacked batches as tensors on the model's device (NCHW), made before any clock is read."""
        return self._x_stack(xs), self._y(ys)

    def train_steps(self, xs, ys) -> np.ndarray:
        if isinstance(xs, torch.Tensor):  # staged by to_device
            xs_t, ys_t = xs, ys
        else:
            xs_t, ys_t = self._x_stack(xs), self._y(ys)
        losses = [self._step(xs_t[k], ys_t[k]) for k in range(len(xs_t))]
        return torch.stack(losses).cpu().numpy().astype(np.float64)  # one host sync for the whole stack

    def _x_stack(self, xs) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(xs, dtype=self.np_dtype)).to(self.dev)
        if t.dim() == 5:
            t = t.permute(0, 1, 4, 2, 3).contiguous()  # K,N,H,W,C -> K,N,C,H,W
        return t

    # -- CUDA graphs (fast mode on CUDA) -------------------------------------------------------------------------
    def _state_tensors(self) -> list[torch.Tensor]:
        """Everything a step writes: parameters, module buffers (BatchNorm state), then the optimizer state (last:
        a warm-up may create it)."""
        ts = list(self.params) + list(self.net.buffers())
        if self.torch_opt is not None:
            for p in self.params:
                ts += [v for v in self.torch_opt.state.get(p, {}).values() if torch.is_tensor(v)]
        else:
            ts += self.m + self.v
        return ts

    def _replay(self, x, y, masks) -> torch.Tensor:
        key = (tuple(x.shape), tuple(y.shape))
        if key not in self._graphs:
            self._capture(key, x, y, masks)
        graph, sx, sy, smasks, sloss = self._graphs[key]
        sx.copy_(x)
        sy.copy_(y)
        for s, m in zip(smasks, masks, strict=True):
            s.copy_(m)
        graph.replay()
        return sloss.clone()

    def _capture(self, key, x, y, masks) -> None:
        """Warm up on a side stream (then restore every parameter, buffer and optimizer state), capture one step.
        The dropout masks are static inputs of the graph, like the batch."""
        sx, sy, smasks = x.clone(), y.clone(), [m.clone() for m in masks]
        self._set_masks(smasks)
        before = [t.clone() for t in self._state_tensors()]
        had_state = self.torch_opt is not None and len(self.torch_opt.state) > 0
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                self._step_body(sx, sy)
        torch.cuda.current_stream().wait_stream(stream)
        with torch.no_grad():
            after = self._state_tensors()
            if self.torch_opt is not None and not had_state:
                # the warm-up created the optimizer state: params restored, the new state back to its zero start
                for t, b in zip(after[: len(before)], before):
                    t.copy_(b)
                for t in after[len(before):]:
                    t.zero_()
            else:
                for t, b in zip(after, before, strict=True):
                    t.copy_(b)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            sloss = self._step_body(sx, sy)
        torch.cuda.synchronize()
        self._graphs[key] = (graph, sx, sy, smasks, sloss)

    # -- the rest of the contract --------------------------------------------------------------------------------
    def gradients(self, x, y):
        """Training mode at step t's masks; the module buffers (BatchNorm state) are restored afterwards."""
        x, y = self._x(x), self._y(y)
        self._set_masks(self._masks(self.t, x.shape[0]))
        buffers = list(self.net.buffers())
        with torch.no_grad():
            saved = [b.clone() for b in buffers]
        try:
            loss, grads = self._loss_grads(x, y)
        finally:
            with torch.no_grad():
                for b, s in zip(buffers, saved):
                    b.copy_(s)
        return float(loss.detach()), self._canonical(grads)

    @torch.no_grad()
    def predict(self, x):
        self.net.eval()
        try:
            out = self.net(self._x(x))
        finally:
            self.net.train()
        pred = self.spec.loss.prediction
        if pred == "sigmoid" and not self.native_sigmoid:
            out = torch.sigmoid(out)
        elif pred == "softmax":
            out = torch.softmax(out, dim=-1)
        return out.cpu().numpy()

    def get_weights(self):
        return self._canonical(self.params)

    def get_state(self):
        return self._canonical(self.state, self.splan)

    def sync(self) -> None:
        if self.dev.type == "cuda":
            torch.cuda.synchronize(self.dev)
