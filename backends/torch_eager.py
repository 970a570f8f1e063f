"""PyTorch eager: an ``nn.Module`` built from the spec through the table :data:`LAYER_BUILDERS` (``nn.Linear``,
``nn.Conv2d``, ``nn.MaxPool2d``, ``nn.AvgPool2d``, ``nn.Flatten``, activations, BatchNorm, LayerNorm, Dropout), and an
optimizer through :data:`OPTIMIZER_BUILDERS` (SGD, Adam, AdamW, RMSprop, Adagrad).

Layout: torch keeps ``Linear.weight`` as ``(out, in)``, conv weights as OIHW, images as NCHW and flattens in
(c, h, w) order.  All conversion happens at the edge, in one place (:func:`layout_plan` / :func:`state_plan` /
:func:`mask_plan`, :func:`to_torch_layout`, :func:`from_torch_layout`, :meth:`Model._x`), both ways, with shape
asserts; what an array is comes from its ``ParamSpec.role`` and its layer's builder, never from its shape:

* dense kernel ``(in, out)`` -> ``W.T``; conv kernel HWIO -> OIHW (``transpose(3, 2, 0, 1)``); biases as they are;
* inputs NHWC -> NCHW (only for image inputs); every (h, w, c) activation is NCHW inside the module;
* a Flatten of an (h, w, c) activation gives torch's (c, h, w) feature order, which lasts until the next Dense: that
  Dense's kernel rows, and the per-feature vectors (BatchNorm gamma / beta / moving statistics, LayerNorm gamma /
  beta) and Dropout masks of the flat layers in between, are permuted from (h, w, c) to (c, h, w) order (and back in
  ``get_weights`` / ``gradients`` / ``get_state``).  Without it nothing raises: only the numbers differ;
* BatchNorm's and LayerNorm's vectors are ``(C,)`` in both layouts (channels of NCHW / features of a flat input);
  Dropout masks of an image are NHWC -> NCHW;
* the spec's "last axis" of an image is torch's dim 1: LayerNorm normalises an NCHW image in its channels-last view
  (:class:`ChannelsLastLayerNorm`, ``permute(0, 2, 3, 1)`` and back), softmax of an image runs over ``dim=1``.

Aligned mode (the spec, literally; ``info["optimizer"]`` says built-in or hand-written, and why):

* Conv2D: ``nn.Conv2d(stride=strides)``; "same" padding is the spec's (:meth:`Conv2D.pads`, TF's rule): torch's own
  ``padding=(top, left)`` where the pads are symmetric, else :class:`PaddedConv2d` (``F.pad`` with the extra row /
  column at the bottom / right, then the convolution).  MaxPool2D: ``nn.MaxPool2d(pool_size, stride)``.
* AveragePooling2D: "valid" ``nn.AvgPool2d(pool_size, stride)``; "same" with symmetric pads
  ``nn.AvgPool2d(padding=p, count_include_pad=False)`` (the divisor counts in-image values only: the spec), with
  asymmetric pads :class:`SameAvgPool2d` (``F.pad``, window sums by ``F.avg_pool2d(divisor_override=1)``, divided by
  the in-image count of each window).
* LayerNorm: ``F.layer_norm`` over the last (spec) axis with the spec's epsilon (:class:`ChannelsLastLayerNorm`).
* Activations: ``nn.Tanh``, ``nn.Softmax`` (last spec axis), ``nn.LeakyReLU(negative_slope)``,
  ``nn.GELU(approximate)``; Dense / Conv2D apply theirs after the layer.
* losses: sse = ``((out - y)**2).sum(-1)``, mse = ``.mean(-1)``; binary cross-entropy =
  ``F.binary_cross_entropy_with_logits(..., reduction="none").mean(-1)``; softmax cross-entropy = ``F.cross_entropy``
  on logits with int64 labels; sparse categorical cross-entropy = ``-log(p[label])`` on the probabilities (no
  clipping); class weights multiply each sample's loss by its class's weight; then sum or mean (/ N) over the batch;
  ``Loss.l2`` adds ``l2 * sum(kernel**2)`` over the kernels (autograd gives ``2*l2*kernel``).
* the step: loss (+ L2) -> gradients -> clip (``ClipNorm``: ``min(1, max_norm/||g||)``, global or per tensor, no
  epsilon: hand-written from ``torch.linalg.vector_norm``, torch's ``clip_grad_norm_`` adds 1e-6) -> (AdamW decay) ->
  update.  The learning rate of update t is ``spec.lr_at(t)`` (set per step: in the built-in's param group, or in a
  0-d tensor the hand-written updates read).
* SGD: built-in ``torch.optim.SGD(lr, momentum, nesterov)`` for the accumulator form (``buf = mu*buf + g``,
  ``p -= lr*buf``, Nesterov ``p -= lr*(g + mu*buf)``: the spec's); the velocity form (Keras) is hand-written.
* Adam, ``eps_v_hat`` convention: built-in ``torch.optim.Adam(params, lr, betas, eps=spec.epsilon)`` (torch adds eps to
  ``sqrt(v_hat)``: the spec's form; its bias corrections are Python doubles from the step count).
* Adam, ``eps_hat`` convention: written by hand with torch ops in the spec's order (``m += (g - m)*(1-b1)``,
  ``v += (g*g - v)*(1-b2)``, ``p -= (m*alpha)/(sqrt(v) + eps)`` with ``alpha = lr*sqrt(1-b2^t)/(1-b1^t)`` computed in
  double on the host and held in a 0-d device tensor): ``torch.optim.Adam`` with a constant eps cannot follow it.  The
  numerics guide's trick, ``torch.optim.Adam`` with ``eps = eps/sqrt(1-b2^t)`` set per step, is kept as
  ``extra={"adam": "torch_optim"}``; it meets the same tolerances but cannot be captured in a CUDA graph
  (``capturable=True`` bakes a Python-float eps into the graph).  ``extra={"adam": "manual"}`` forces the hand-written
  update for either convention; ``extra={"optimizer": "manual"}`` forces it for every optimizer (the code CUDA-graph
  fast mode captures, testable on CPU).
* AdamW: built-in ``torch.optim.AdamW(weight_decay=wd)`` for eps_v_hat with ``decay_times_lr`` (torch:
  ``p.mul_(1 - lr*wd)`` before the Adam update, torch/optim/adam.py ``_single_tensor_adam``); otherwise the
  hand-written Adam after a hand-written ``p -= lr_t*wd*p`` (or ``wd*p``).
* RMSprop: built-in ``torch.optim.RMSprop(lr, alpha=rho, eps)`` when the spec puts epsilon outside the square root and
  starts at 0 (torch: ``square_avg.sqrt().add_(eps)``, zeros: torch/optim/rmsprop.py ``_single_tensor_rmsprop``,
  ``RMSprop._init_group``); otherwise hand-written (torch cannot put eps inside ``sqrt`` nor start elsewhere).
* Adagrad: built-in ``torch.optim.Adagrad(lr, initial_accumulator_value, eps)`` when epsilon is outside the square
  root (torch/optim/adagrad.py ``_single_tensor_adagrad``: ``state_sum.sqrt().add_(eps)``); otherwise hand-written.
* CUDA-graph fast mode keeps the hand-written Adam for ``eps_v_hat`` too: ``torch.optim.Adam(capturable=True)`` keeps
  its step count in a float32 tensor (``_get_scalar_dtype()``: float64 only when torch's default dtype is) and
  computes the bias corrections from it on the device, in float32 -- measured with the same branch on CPU
  (``differentiable=True``), Pima float64: 6.6e-8 scaled error after one step, 4.5e-5 over 20 steps (float32 runs:
  4.8e-5, against 3.0e-6 for the non-capturable built-in).  Fast mode uses the hand-written update for every
  optimizer but plain SGD (whose built-in captures) and native Adam / AdamW (``capturable=True``, what a torch user
  captures), and for all of them under a schedule (a built-in bakes its Python-float lr into the graph); the
  hand-written updates read lr, Adam's alpha and AdamW's decay from 0-d device tensors.  Clipping (hand-written, or
  ``clip_grad_norm_``) runs on the device without a host sync.  Untested on a GPU in this revision: the updates are
  checked on CPU through ``extra={"optimizer": "manual"}``.
* BatchNorm: torch's own op normalises (``torch.batch_norm`` with no running statistics, training mode: the batch's
  mean and *biased* variance, the spec's epsilon; inference: the moving statistics).  The moving statistics are
  updated by hand from ``torch.var_mean(correction=0)`` as ``moving*momentum + stat*(1-momentum)`` (the spec's
  convention), storing ``var*n/(n-1)`` only when ``unbiased_moving_variance`` and n > 1: torch's own running-stats
  update always stores the unbiased variance, which the spec's default (biased) cannot configure.
* Dropout: multiplies by the harness's masks (:meth:`ModelBase.dropout_masks` of the step: updates applied so far),
  converted to torch's layout and handed to the module before each forward pass (static inputs of a CUDA graph).
* ``gradients`` runs training mode, reports the unclipped gradients of the loss (+ L2) and leaves the BatchNorm state
  as it found it (buffers restored).
* CUDA: TF32 off for matmuls and cuDNN convolutions (torch's default lets cuDNN use TF32).
* Max-pooling routes the gradient to the first maximum of each window on CPU and CUDA, like the NumPy oracle.

Native mode: what a torch user writes when porting the spec -- torch's built-in layer / loss / optimizer with the
spec's primary values (units, lr, rate, momentum value, max_norm, class weights, schedule) and torch's defaults for
the rest -- one :data:`backends.base.NATIVE_KEYS` key at a time (``Model.native(key)``; ``extra["native_only"]`` picks
keys, the others stay aligned).  Each key whose torch default differs from the spec in a run is listed in
``info["native_settings"]`` (``{key: "torch API with the value"}``) and, in prose, ``info["native_differences"]``.
The defaults, read from a default torch object where torch exposes them (measured in tests/test_hazards_torch.py):

* ``conv_same_padding``: ``nn.Conv2d(padding='same')`` refuses stride > 1 (torch/nn/modules/conv.py
  ``_ConvNd.__init__``: "padding='same' is not supported for strided convolutions"), so a torch user writes
  ``padding=(kh//2, kw//2)``: symmetric, where TF puts the odd row / column at the bottom / right.  At stride 1 the
  user writes ``padding='same'``, which pads as the spec does (the extra pixel right / bottom: ``_ConvNd.__init__``'s
  ``_reversed_padding_repeated_twice``).  An even kernel at stride > 1 changes the output shape: Unsupported.
* ``avgpool_count_pad``: ``nn.AvgPool2d(k, stride, padding=k//2)``, ``count_include_pad=True`` by default
  (torch/nn/modules/pooling.py ``AvgPool2d.__init__``): padded zeros counted in the divisor, pads symmetric.
* ``layernorm_epsilon``: ``nn.LayerNorm(C)``, eps=1e-5 (torch/nn/modules/normalization.py ``LayerNorm.__init__``).
* ``leaky_relu_slope``: ``nn.LeakyReLU()``, negative_slope=0.01 (torch/nn/modules/activation.py
  ``LeakyReLU.__init__``).  ``gelu_approximation``: ``nn.GELU()``, approximate='none' (``GELU.__init__``): the spec's
  default; differs only where the spec says "tanh".
* ``loss_form``: ``nn.MSELoss`` for sse (means over the outputs too) and for mse with ``reduction="sum"`` (sums over
  them), ``nn.Sigmoid`` + ``nn.BCELoss`` on probabilities (log clamped at -100), ``nn.CrossEntropyLoss`` (= the spec).
* ``mse_broadcast``: a one-unit mse output against labels as a vector: ``nn.MSELoss()(out, y.reshape(-1))``
  broadcasts ``(N, 1)`` against ``(N,)`` to ``(N, N)`` (torch/nn/functional.py ``mse_loss`` only warns; the warning is
  silenced here, the row says so).
* ``sparse_cce_probabilities``: ``nn.CrossEntropyLoss()(p, y)`` on the probabilities (softmax applied twice).
* ``class_weight_denominator``: ``nn.CrossEntropyLoss(weight=w)`` (or ``nn.NLLLoss(weight=w)`` on ``log(p)``) divides
  the weighted sum by the sum of the batch's weights (torch/nn/modules/loss.py, the ``CrossEntropyLoss`` and
  ``NLLLoss`` docstrings: "mean" divides by ``sum w_{y_n}``), the spec by N.
* ``batchnorm_momentum`` / ``batchnorm_epsilon`` / ``batchnorm_variance``: ``nn.BatchNorm1d/2d()`` momentum 0.1 in
  torch's convention (0.9 in the spec's), eps 1e-5 (torch/nn/modules/batchnorm.py ``_NormBase.__init__``), unbiased
  running variance (the ``BatchNorm1d`` docstring; ATen's batch_norm computes it); all three: torch's module itself,
  fewer: the aligned BatchNorm with torch's values substituted.  ``dropout_rng``: ``nn.Dropout(rate)`` on torch's RNG,
  seeded with the run's seed.
* ``momentum_form``: torch.optim.SGD's accumulator (torch/optim/sgd.py ``_single_tensor_sgd``:
  ``buf.mul_(momentum).add_(grad)``; Nesterov ``grad.add(buf, alpha=momentum)``).
* ``adam_epsilon`` / ``adam_convention``: ``torch.optim.Adam`` / ``AdamW`` eps=1e-8 added to ``sqrt(v_hat)``
  (torch/optim/adam.py ``Adam.__init__``, ``_single_tensor_adam``).  ``adamw_weight_decay``: ``torch.optim.AdamW``
  weight_decay=1e-2 (torch/optim/adamw.py ``AdamW.__init__``); ``adamw_decay_form``: times lr
  (``param.mul_(1 - lr * weight_decay)``).
* ``rmsprop_rho`` / ``rmsprop_epsilon`` / ``rmsprop_accumulator``: ``torch.optim.RMSprop`` alpha=0.99, eps=1e-8
  added outside the square root, ``square_avg`` from zeros (torch/optim/rmsprop.py ``RMSprop.__init__``,
  ``_single_tensor_rmsprop``, ``_init_group``).
* ``adagrad_accumulator`` / ``adagrad_epsilon``: ``torch.optim.Adagrad`` initial_accumulator_value=0, eps=1e-10
  outside the square root (torch/optim/adagrad.py ``Adagrad.__init__``, ``_single_tensor_adagrad``).
* ``l2_regularization``: the optimizer's ``weight_decay=l2`` (torch/optim/sgd.py ``_single_tensor_sgd``:
  ``grad.add(param, alpha=weight_decay)``, the same in Adam / RMSprop / Adagrad): ``l2*p`` added to *every*
  parameter's gradient inside ``step()`` (after clipping), no penalty in the loss (spec: ``l2*sum(kernel**2)``, gradient
  ``2*l2*kernel``).  Not for AdamW, whose ``weight_decay`` is the decoupled decay: there the spec's penalty stays.
* ``clip_scope`` / ``clip_epsilon``: ``torch.nn.utils.clip_grad_norm_(params, max_norm)``: the global norm, scaled by
  ``min(1, max_norm / (total_norm + 1e-6))`` (torch/nn/utils/clip_grad.py ``_clip_grads_with_norm_``).
* ``lr_schedule``: ``torch.optim.lr_scheduler.StepLR(opt, step_size=every, gamma=factor)`` stepped after every update
  (torch/optim/lr_scheduler.py ``StepLR.get_lr``: ``group["lr"] * gamma`` at each multiple of step_size, a repeated
  product where the spec writes ``lr * factor**k``: equal up to rounding).  The hand-written updates read the lr of a
  holder ``torch.optim.SGD`` that the same ``StepLR`` drives.
* ``matmul_precision``: TF32 left at torch's defaults on CUDA (cuDNN convolutions may use TF32); nothing on CPU.

Fast mode: on CUDA the whole step (forward, loss, backward, clip, update, BatchNorm state, dropout masks as static
inputs) is captured once per batch shape in a CUDA graph and replayed; on CPU it is a no-op (noted in ``info``).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

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
    Layer,
    LayerNorm,
    MaxPool2D,
    ModelSpec,
    RMSprop,
    init_state,
)

from .base import BuildOptions, Capabilities, ModelBase, Unsupported, lookup, to_mib, value_diff

BACKEND = "torch"

CAPABILITIES = Capabilities(
    devices=("cpu", "cuda"),
    notes=("canonical weights converted at the edge: Linear W.T, conv HWIO->OIHW, NHWC->NCHW, flatten rows (h,w,c)"
           "->(c,h,w) (also BatchNorm / LayerNorm vectors and dropout masks of the flat layers after a Flatten)",
           "aligned optimizers: torch.optim built-ins where they compute the spec (SGD accumulator form, Adam/AdamW "
           "eps_v_hat, RMSprop/Adagrad with eps outside sqrt), hand-written otherwise (and in CUDA-graph fast mode)",
           "aligned 'same' padding: TF's rule (F.pad where asymmetric); average pooling counts in-image values only",
           "aligned BatchNorm: torch.batch_norm on batch statistics, moving statistics updated by hand (spec "
           "momentum, biased or unbiased)", "aligned Dropout: the harness's masks", "fast mode = CUDA graph replay"),
)

_DTYPES = {"float32": torch.float32, "float64": torch.float64}
# torch.nn.utils.clip_grad_norm_ adds this to the total norm (torch/nn/utils/clip_grad.py, _clip_grads_with_norm_:
# ``clip_coef = max_norm / (total_norm + 1e-6)``; a literal there, measured in tests/test_hazards_torch.py)
TORCH_CLIP_EPS = 1e-6


def probe() -> str:
    return torch.__version__


def devices() -> list[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def torch_defaults(cls) -> dict:
    """The defaults of a ``torch.optim`` class, read from an instance (``RMSprop``: alpha 0.99, eps 1e-8, ...)."""
    return dict(cls([torch.zeros(1, requires_grad=True)]).defaults)


def _never(key: str) -> bool:
    return False


def _native_fn(native) -> Callable[[str], bool]:
    """``native`` as a function of the key: a bool applies to every key (``build_module(spec, native=True)``)."""
    if callable(native):
        return native
    return (lambda key: True) if native else _never


# ------------------------------------------------------------------------------------------------ the layer table
# activation -> module factory (image: the input is NCHW, whose spec "last axis" is torch's dim 1)
_ACTS: dict[str, Callable[[bool], nn.Module] | None] = {
    "linear": None,
    "sigmoid": lambda image: nn.Sigmoid(),
    "relu": lambda image: nn.ReLU(),
    "tanh": lambda image: nn.Tanh(),
    "softmax": lambda image: nn.Softmax(dim=1 if image else -1),
}


def _act(kind: str, image: bool = False) -> list[nn.Module]:
    make = _ACTS[kind]
    return [] if make is None else [make(image)]


class AlignedBatchNorm(nn.Module):
    """The spec's BatchNorm: ``torch.batch_norm`` normalises (training: the batch's mean and biased variance, no
    running statistics handed to it; inference: the moving statistics); the moving statistics move by hand as
    ``moving * momentum + stat * new_weight`` (``new_weight``: ``1 - momentum`` in the run's dtype, or torch's own
    momentum where native mode substitutes it).  Parameters ``weight`` (gamma) then ``bias`` (beta), buffers
    ``running_mean`` / ``running_var``, all ``(C,)``.  Channels: dim 1 of an NCHW input, the last dim otherwise."""

    def __init__(self, channels: int, momentum: float, eps: float, unbiased: bool,
                 new_weight: float | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))
        self.eps = float(eps)
        self.momentum = float(momentum)
        self.new_weight = new_weight
        self.unbiased = bool(unbiased)

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
            mom = float(dt(self.momentum))
            rest = float(dt(1) - dt(self.momentum)) if self.new_weight is None else float(dt(self.new_weight))
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


class PaddedConv2d(nn.Conv2d):
    """``nn.Conv2d`` (no padding of its own) after ``F.pad(x, pads)`` with ``pads = (left, right, top, bottom)``
    zeros: TF's asymmetric "same" padding, which ``nn.Conv2d(padding=...)`` (symmetric) cannot express."""

    def __init__(self, *args, pads: tuple[int, int, int, int], **kw) -> None:
        super().__init__(*args, padding=0, **kw)
        self.pads = tuple(int(p) for p in pads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, self.pads))


class SameAvgPool2d(nn.Module):
    """TF's "same" average pooling with asymmetric pads ``(left, right, top, bottom)``: each window's sum over the
    zero-padded input (``F.avg_pool2d(divisor_override=1)``) divided by the number of its values inside the image (the
    same pooling of a padded tensor of ones).  ``nn.AvgPool2d(count_include_pad=False)`` does this for symmetric pads
    only."""

    def __init__(self, pool: int, stride: int, pads: tuple[int, int, int, int]) -> None:
        super().__init__()
        self.pool, self.stride, self.pads = int(pool), int(stride), tuple(int(p) for p in pads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        def window_sums(t):
            return F.avg_pool2d(F.pad(t, self.pads), self.pool, self.stride, divisor_override=1)

        return window_sums(x) / window_sums(torch.ones_like(x[:1, :1]))


class ChannelsLastLayerNorm(nn.LayerNorm):
    """``nn.LayerNorm(C)`` over the spec's last axis: the features of a flat input, the channels of an NCHW image
    (normalised in its channels-last view, ``permute(0, 2, 3, 1)``, then permuted back).  ``weight`` = gamma, ``bias``
    = beta, both ``(C,)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:
            return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return super().forward(x)


def _dense(layer: Dense, shape, native) -> list[nn.Module]:
    return [nn.Linear(shape[0], layer.units, bias=layer.use_bias)] + _act(layer.activation)


def _torch_symmetric_pads(layer, shape, window: tuple[int, int], stride: tuple[int, int], what: str):
    """A torch user's ``padding=(kh//2, kw//2)`` for TF's "same" at stride > 1: the pads, or Unsupported where it
    changes the output shape (an even window: ``(n + 2*(k//2) - k)//s + 1 = n//s + 1`` against ``ceil(n/s)``)."""
    pads = tuple(k // 2 for k in window)
    out = tuple((n + 2 * p - k) // s + 1 for n, p, k, s in zip(shape[:2], pads, window, stride))
    want = layer.output_shape(shape)[:2]
    if out != tuple(want):
        raise Unsupported(f"{BACKEND} native {type(layer).__name__}: a torch user's {what}(padding={pads}) gives a "
                          f"{out[0]}x{out[1]} output where the spec's 'same' gives {want[0]}x{want[1]} (even window "
                          f"{window} at stride {stride}): the port changes shapes")
    return pads


def _conv(layer: Conv2D, shape, native) -> list[nn.Module]:
    c, f, k, s = shape[2], layer.filters, tuple(layer.kernel_size), tuple(layer.strides)
    (top, bottom), (left, right) = layer.pads(shape)
    if layer.padding == "same" and native("conv_same_padding"):
        if s == (1, 1):  # what a torch user writes at stride 1: torch pads the extra pixel right / bottom, as TF
            conv = nn.Conv2d(c, f, k, stride=1, padding="same", bias=layer.use_bias)
        else:  # padding='same' refuses stride > 1
            conv = nn.Conv2d(c, f, k, stride=s, padding=_torch_symmetric_pads(layer, shape, k, s, "nn.Conv2d"),
                             bias=layer.use_bias)
    elif top == bottom and left == right:
        conv = nn.Conv2d(c, f, k, stride=s, padding=(top, left), bias=layer.use_bias)
    else:
        conv = PaddedConv2d(c, f, k, stride=s, bias=layer.use_bias, pads=(left, right, top, bottom))
    return [conv] + _act(layer.activation, image=True)


def _conv_native_diffs(layer: Conv2D, shape, native, dtype: str) -> list[tuple[str, str, str]]:
    if layer.padding != "same" or tuple(layer.strides) == (1, 1) or not native("conv_same_padding"):
        return []
    pads = tuple((k // 2, k // 2) for k in layer.kernel_size)
    if pads == tuple(layer.pads(shape)):
        return []
    sym = tuple(k // 2 for k in layer.kernel_size)
    return [("conv_same_padding", f"nn.Conv2d(stride={tuple(layer.strides)}, padding={sym})",
             f"Conv2D 'same' at stride {tuple(layer.strides)} on {shape[0]}x{shape[1]}: torch padding={sym} pads "
             f"{pads} symmetrically (nn.Conv2d(padding='same') refuses stride > 1; spec/TF pads "
             f"{tuple(layer.pads(shape))}, the extra row/column bottom/right)")]


def _maxpool(layer: MaxPool2D, shape, native) -> list[nn.Module]:
    return [nn.MaxPool2d(layer.pool_size, stride=layer.stride)]


def _avgpool(layer: AveragePooling2D, shape, native) -> list[nn.Module]:
    k, s = int(layer.pool_size), layer.stride
    if layer.padding == "valid":
        return [nn.AvgPool2d(k, stride=s)]
    if native("avgpool_count_pad"):  # a torch user: padding=k//2, count_include_pad=True by default
        return [nn.AvgPool2d(k, stride=s, padding=_torch_symmetric_pads(layer, shape, (k, k), (s, s),
                                                                         "nn.AvgPool2d"))]
    (top, bottom), (left, right) = layer.pads(shape)
    if top == bottom and left == right:
        return [nn.AvgPool2d(k, stride=s, padding=(top, left), count_include_pad=False)]
    return [SameAvgPool2d(k, s, (left, right, top, bottom))]


def _avgpool_native_diffs(layer: AveragePooling2D, shape, native, dtype: str) -> list[tuple[str, str, str]]:
    if layer.padding != "same" or not native("avgpool_count_pad"):
        return []
    k, s, pads = int(layer.pool_size), layer.stride, tuple(layer.pads(shape))
    if pads == ((0, 0), (0, 0)):
        return []  # nothing padded: nothing counted
    return [("avgpool_count_pad", f"nn.AvgPool2d({k}, stride={s}, padding={k // 2}, count_include_pad=True)",
             f"AveragePooling2D 'same': torch nn.AvgPool2d(padding={k // 2}) counts the padded zeros in the divisor "
             f"(count_include_pad=True) and pads symmetrically (spec: in-image values only, pads {pads})")]


def _flatten(layer: Flatten, shape, native) -> list[nn.Module]:
    return [nn.Flatten()]


def _activation(layer: Activation, shape, native) -> list[nn.Module]:
    if layer.activation == "leaky_relu":
        return [nn.LeakyReLU() if native("leaky_relu_slope") else nn.LeakyReLU(layer.negative_slope)]
    if layer.activation == "gelu":
        return [nn.GELU() if native("gelu_approximation") else nn.GELU(approximate=layer.approximate)]
    return _act(layer.activation, image=len(shape) == 3) or [nn.Identity()]


def _activation_native_diffs(layer: Activation, shape, native, dtype: str) -> list[tuple[str, str, str]]:
    out = []
    if layer.activation == "leaky_relu" and native("leaky_relu_slope"):
        slope = nn.LeakyReLU().negative_slope
        d = value_diff("leaky_relu negative slope: torch nn.LeakyReLU()", slope, layer.negative_slope, dtype)
        if d:
            out.append(("leaky_relu_slope", f"nn.LeakyReLU(negative_slope={slope:g})", d))
    if layer.activation == "gelu" and native("gelu_approximation"):
        approx = nn.GELU().approximate
        if approx != layer.approximate:
            out.append(("gelu_approximation", f"nn.GELU(approximate={approx!r})",
                        f"gelu: torch nn.GELU() approximate={approx!r} (spec {layer.approximate!r})"))
    return out


def _layernorm(layer: LayerNorm, shape, native) -> list[nn.Module]:
    if native("layernorm_epsilon"):
        return [ChannelsLastLayerNorm(shape[-1])]  # torch's default eps
    return [ChannelsLastLayerNorm(shape[-1], eps=layer.epsilon)]


def _layernorm_native_diffs(layer: LayerNorm, shape, native, dtype: str) -> list[tuple[str, str, str]]:
    if not native("layernorm_epsilon"):
        return []
    eps = nn.LayerNorm(1).eps
    d = value_diff("LayerNorm epsilon: torch nn.LayerNorm", eps, layer.epsilon, dtype)
    return [("layernorm_epsilon", f"nn.LayerNorm({shape[-1]}, eps={eps:g})", d)] if d else []


_BN_KEYS = ("batchnorm_momentum", "batchnorm_epsilon", "batchnorm_variance")


def _torch_bn() -> nn.Module:
    return nn.BatchNorm1d(1)  # torch's defaults, read from a default module


def _batchnorm(layer: BatchNorm, shape, native) -> list[nn.Module]:
    if all(native(k) for k in _BN_KEYS):
        if len(shape) == 3:
            return [nn.BatchNorm2d(shape[-1])]  # torch's defaults, untouched
        if len(shape) == 1:
            return [nn.BatchNorm1d(shape[-1])]
        raise Unsupported(f"{BACKEND} native BatchNorm on a per-sample shape {shape}: nn.BatchNorm1d would normalise "
                          "dim 1, not the last axis")
    bn = _torch_bn()
    if native("batchnorm_momentum"):  # torch's momentum is the weight of the new value
        momentum, new = 1.0 - bn.momentum, bn.momentum
    else:
        momentum, new = layer.momentum, None
    return [AlignedBatchNorm(shape[-1], momentum, bn.eps if native("batchnorm_epsilon") else layer.epsilon,
                             True if native("batchnorm_variance") else layer.unbiased_moving_variance, new)]


def _batchnorm_native_diffs(layer: BatchNorm, shape, native, dtype: str) -> list[tuple[str, str, str]]:
    """What torch's ``nn.BatchNorm*d()`` defaults do differently from this layer (read from a default module)."""
    bn = _torch_bn()
    kind = "nn.BatchNorm2d" if len(shape) == 3 else "nn.BatchNorm1d"
    out = []
    if native("batchnorm_momentum"):
        d = value_diff("BatchNorm momentum", 1.0 - bn.momentum, layer.momentum, dtype,
                       f" (torch's momentum={bn.momentum:g} is the weight of the new value)")
        if d:
            out.append(("batchnorm_momentum", f"{kind}(momentum={bn.momentum:g})", d))
    if native("batchnorm_epsilon"):
        d = value_diff("BatchNorm epsilon", bn.eps, layer.epsilon, dtype)
        if d:
            out.append(("batchnorm_epsilon", f"{kind}(eps={bn.eps:g})", d))
    if native("batchnorm_variance") and not layer.unbiased_moving_variance:
        out.append(("batchnorm_variance", f"{kind}(): unbiased running_var",
                    "BatchNorm running variance: torch stores the unbiased batch variance (spec: biased)"))
    return out


def _dropout(layer: Dropout, shape, native) -> list[nn.Module]:
    return [nn.Dropout(layer.rate)] if native("dropout_rng") else [MaskedDropout()]


def _dropout_native_diffs(layer: Dropout, shape, native, dtype: str) -> list[tuple[str, str, str]]:
    if layer.rate > 0 and native("dropout_rng"):
        return [("dropout_rng", f"nn.Dropout(p={layer.rate:g}), torch's RNG",
                 "Dropout masks from torch's RNG: trajectories not comparable")]
    return []


def _bn_state(module: nn.Module) -> list[torch.Tensor]:
    return [module.running_mean, module.running_var]


@dataclass(frozen=True)
class LayerBuilder:
    """How one layer type becomes torch modules, and what its arrays and features are in torch's layout.

    ``build(layer, input shape, native)`` gives the layer's modules (``native(key)``: whether torch's default for that
    :data:`backends.base.NATIVE_KEYS` key applies); the first holds its parameters in the spec's order.  ``kernel``:
    the layout of its "kernel" role ("dense": ``(out, in)``; "conv": OIHW).  ``flat``: what it does to the order of a
    flat activation's features: "keep" (elementwise, or symmetric in them), "flatten" (a Flatten of (h, w, c) gives
    torch's (c, h, w) order), "new" (fresh features, in the same order in both layouts).  ``state``: first module ->
    its state tensors in the spec's order.  ``masked``: aligned mode feeds it the harness's dropout masks.
    ``native_diffs(layer, input shape, native, dtype)``: ``(key, torch setting, prose)`` for each active native key
    whose torch default differs from the layer's spec."""

    build: Callable
    kernel: str | None = None
    flat: str = "keep"
    state: Callable | None = None
    masked: bool = False
    native_diffs: Callable | None = None


LAYER_BUILDERS: dict[type, LayerBuilder | str] = {
    Dense: LayerBuilder(_dense, kernel="dense", flat="new"),
    Conv2D: LayerBuilder(_conv, kernel="conv", flat="new", native_diffs=_conv_native_diffs),
    MaxPool2D: LayerBuilder(_maxpool, flat="new"),
    AveragePooling2D: LayerBuilder(_avgpool, flat="new", native_diffs=_avgpool_native_diffs),
    Flatten: LayerBuilder(_flatten, flat="flatten"),
    Activation: LayerBuilder(_activation, native_diffs=_activation_native_diffs),
    BatchNorm: LayerBuilder(_batchnorm, state=_bn_state, native_diffs=_batchnorm_native_diffs),
    LayerNorm: LayerBuilder(_layernorm, native_diffs=_layernorm_native_diffs),
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
def build_layers(spec: ModelSpec, native=False) -> list[tuple[_LayerPlace, list[nn.Module]]]:
    """Each layer with its modules (built by its :data:`LAYER_BUILDERS` entry); ``native``: a bool (every key) or a
    function of the :data:`backends.base.NATIVE_KEYS` key (``Model.native``)."""
    native = _native_fn(native)
    return [(p, p.builder.build(p.layer, p.in_shape, native)) for p in _walk(spec)]


def build_module(spec: ModelSpec, final_sigmoid: bool = False, native=False) -> nn.Sequential:
    """The spec as an ``nn.Sequential``; parameters come out in ``spec.param_names()`` order (weight, bias, ...)."""
    mods = [m for _, ms in build_layers(spec, native) for m in ms]
    if final_sigmoid:
        mods.append(nn.Sigmoid())
    return nn.Sequential(*mods)


# ------------------------------------------------------------------------------------------------------ the loss
def _sse(out, y):
    d = out - y
    return (d * d).sum(-1)


def _mse(out, y):
    d = out - y
    return (d * d).mean(-1)


# loss kind -> per-sample loss of the network output (logits for the cross-entropies from logits, probabilities for
# sparse_categorical_crossentropy: -log p[label], gathered before the log so that no other class's p is touched)
_PER_SAMPLE: dict[str, Callable] = {
    "sse": _sse,
    "mse": _mse,
    "binary_crossentropy": lambda out, y: F.binary_cross_entropy_with_logits(out, y, reduction="none").mean(-1),
    "softmax_crossentropy": lambda out, y: F.cross_entropy(out, y, reduction="none"),
    "sparse_categorical_crossentropy": lambda p, y: -torch.log(p.gather(1, y[:, None])[:, 0]),
}
# integer-label loss -> torch's class-weighted loss (``weight=``: a "mean" divides by the sum of the batch's weights)
_TORCH_WEIGHTED: dict[str, tuple[str, Callable]] = {
    "softmax_crossentropy": ("nn.CrossEntropyLoss(weight=class_weights)",
                             lambda out, y, w, red: F.cross_entropy(out, y, weight=w, reduction=red)),
    "sparse_categorical_crossentropy": ("nn.NLLLoss(weight=class_weights) on log(p)",
                                        lambda p, y, w, red: F.nll_loss(torch.log(p), y, weight=w, reduction=red)),
}


def _broadcast_mse(reduction: str) -> Callable:
    def loss(out, y):  # labels as a vector, as a torch user loading a CSV has them: (N, 1) - (N,) -> (N, N)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torch's "Using a target size ... broadcasting"
            return F.mse_loss(out, y.reshape(-1), reduction=reduction)

    return loss


def make_loss(spec: ModelSpec, native=False, dtype=torch.float64, device=None):
    """The loss of the network output (without the L2 penalty) and ``[(key, torch setting, prose)]`` for each active
    native key that changes it: ``(fn, diffs, sigmoid_in_net)`` (``sigmoid_in_net``: a torch user's ``nn.Sigmoid``
    ends the network and ``nn.BCELoss`` takes probabilities)."""
    native = _native_fn(native)
    kind, red, k = spec.loss.kind, spec.loss.reduction, spec.n_outputs
    diffs: list[tuple[str, str, str]] = []
    weights = (torch.tensor(spec.loss.class_weights, dtype=dtype, device=device) if spec.loss.class_weights
               else None)
    torch_weighted = weights is not None and native("class_weight_denominator")
    per_sample, (weighted_api, weighted) = _PER_SAMPLE[kind], _TORCH_WEIGHTED.get(kind, (None, None))
    if kind == "sparse_categorical_crossentropy" and native("sparse_cce_probabilities"):
        # nn.CrossEntropyLoss()(p, y): torch's loss from logits handed the probabilities
        per_sample, (weighted_api, weighted) = _PER_SAMPLE["softmax_crossentropy"], _TORCH_WEIGHTED["softmax_crossentropy"]
        diffs.append(("sparse_cce_probabilities", "nn.CrossEntropyLoss()(probabilities, y)",
                      "sparse categorical cross-entropy: nn.CrossEntropyLoss on the softmax's probabilities applies "
                      "softmax again (spec: -log p[label])"))
    if torch_weighted and red == "mean":
        diffs.append(("class_weight_denominator", weighted_api,
                      "class weights: torch's weighted mean divides by the sum of the batch's weights (spec: by the "
                      "batch size N)"))

    def reduce(per, y):
        if weights is not None:
            per = per * weights[y]
        return per.mean() if red == "mean" else per.sum()

    def aligned(out, y):
        if torch_weighted:
            return weighted(out, y, weights, red)
        return reduce(per_sample(out, y), y)

    fn, sigmoid_in_net = aligned, False
    if kind == "mse" and k == 1 and native("mse_broadcast"):
        fn = _broadcast_mse(red)
        diffs.append(("mse_broadcast", f"nn.MSELoss({'' if red == 'mean' else repr('sum')})(out, y.reshape(-1))",
                      "mse: nn.MSELoss with (N,) labels against the (N, 1) output broadcasts to (N, N) (torch only "
                      "warns; spec: (out - y)**2 per sample)"))
    elif kind in ("sse", "mse") and native("loss_form"):
        fn = nn.MSELoss(reduction=red)
        if kind == "sse" and red == "mean" and k > 1:
            diffs.append(("loss_form", "nn.MSELoss()", f"sse: nn.MSELoss() averages over the {k} outputs too (spec: "
                          "sum over outputs)"))
        if kind == "mse" and red == "sum" and k > 1:
            diffs.append(("loss_form", "nn.MSELoss(reduction='sum')", f"mse: nn.MSELoss(reduction='sum') sums over "
                          f"the {k} outputs (spec: mean over outputs)"))
    elif kind == "binary_crossentropy" and native("loss_form"):
        fn, sigmoid_in_net = nn.BCELoss(reduction=red), True
        prose = ("binary cross-entropy: nn.Sigmoid + nn.BCELoss on probabilities (log clamped at -100, gradient "
                 "through a saturating sigmoid); spec: stable formula from logits")
        if red == "sum" and k > 1:
            prose += f"; nn.BCELoss(reduction='sum') sums over the {k} outputs (spec: mean over outputs)"
        diffs.append(("loss_form", f"nn.Sigmoid() + nn.BCELoss({'' if red == 'mean' else repr('sum')})", prose))
    return fn, diffs, sigmoid_in_net


def aligned_loss(spec: ModelSpec):
    """The spec's loss from the network output (logits for the cross-entropies from logits)."""
    return make_loss(spec)[0]


def native_loss(spec: ModelSpec) -> tuple[Callable, list[str]]:
    """The loss a torch user writes for this spec (every native key), and how it differs from the spec."""
    fn, diffs, _ = make_loss(spec, native=True)
    return fn, [d[2] for d in diffs]


# ---------------------------------------------------------------------------------------------- the optimizer table
@dataclass(frozen=True)
class Update:
    """What one update computes: the spec's optimizer with torch's defaults substituted for the active native keys
    (plain Python floats: torch's defaults such as ``alpha=0.99`` are not float32 numbers, which the spec's dataclasses
    require).  ``kind`` picks the hand-written update (:data:`HAND_UPDATES`); the formulas are the spec's
    (models/spec.py ``SGD``, ``Adam``, ``AdamW``, ``RMSprop``, ``Adagrad``).  ``coupled_decay``: torch's
    ``weight_decay`` of SGD / Adam / RMSprop / Adagrad, ``g += coupled_decay * p`` (a torch user's L2)."""

    kind: str  # "sgd" | "adam" | "rmsprop" | "adagrad"
    lr: float
    momentum: float = 0.0
    nesterov: bool = False
    momentum_form: str = "accumulator"
    beta1: float = 0.9
    beta2: float = 0.999
    epsilon: float = 0.0
    convention: str = "eps_v_hat"
    rho: float = 0.9
    epsilon_inside_sqrt: bool = False
    initial_accumulator: float = 0.0
    weight_decay: float = 0.0  # AdamW's decoupled decay: p -= lr_t*wd*p (or wd*p) before the Adam update
    decay_times_lr: bool = True
    coupled_decay: float = 0.0


@dataclass(frozen=True)
class HandUpdate:
    """A hand-written update: ``state(u, p)`` -> its state tensors for parameter p; ``step(model, u, p, g, state)``
    updates p in place, reading the learning rate of this update from ``model._lr`` (and Adam's ``model._alpha`` /
    ``model._c2``): 0-d device tensors set on the host before each step, so that a CUDA graph replays them."""

    state: Callable
    step: Callable


def _sgd_step(model, u: Update, p, g, s) -> None:
    lr = model._lr
    if not u.momentum:
        p.sub_(lr * g)
    elif u.momentum_form == "accumulator":  # b = mu*b + g; p -= lr*b (Nesterov: lr*(g + mu*b))
        (b,) = s
        b.mul_(u.momentum).add_(g)
        p.sub_(lr * (g + u.momentum * b) if u.nesterov else lr * b)
    else:  # velocity: v = mu*v - lr*g; p += v (Nesterov: mu*v - lr*g)
        (v,) = s
        v.mul_(u.momentum).sub_(lr * g)
        p.add_(u.momentum * v - lr * g if u.nesterov else v)


def _adam_step(model, u: Update, p, g, s) -> None:
    m, v = s
    m.lerp_(g, model._b1c)  # m += (g - m) * (1 - b1): lerp computes exactly this for weights < 0.5
    v.lerp_(g * g, model._b2c)  # v += (g*g - v) * (1 - b2)
    if u.convention == "eps_hat":  # p -= alpha_t * m / (sqrt(v) + eps)
        p.sub_((m * model._alpha).div_(v.sqrt().add_(u.epsilon)))
    else:  # eps_v_hat: p -= lr*m_hat / (sqrt(v_hat) + eps)
        p.sub_((m * model._alpha).div_((v * model._c2).sqrt_().add_(u.epsilon)))


def _root(u: Update, acc):
    """``sqrt(acc + eps)`` (epsilon inside the square root) or ``sqrt(acc) + eps``."""
    return (acc + u.epsilon).sqrt_() if u.epsilon_inside_sqrt else acc.sqrt().add_(u.epsilon)


def _rmsprop_step(model, u: Update, p, g, s) -> None:
    (v,) = s
    v.mul_(u.rho).addcmul_(g, g, value=1.0 - u.rho)  # v = rho*v + (1 - rho)*g^2
    p.sub_(model._lr * g / _root(u, v))


def _adagrad_step(model, u: Update, p, g, s) -> None:
    (a,) = s
    a.addcmul_(g, g)  # a = a + g^2
    p.sub_(model._lr * g / _root(u, a))


HAND_UPDATES: dict[str, HandUpdate] = {
    "sgd": HandUpdate(lambda u, p: [torch.zeros_like(p)] if u.momentum else [], _sgd_step),
    "adam": HandUpdate(lambda u, p: [torch.zeros_like(p), torch.zeros_like(p)], _adam_step),
    "rmsprop": HandUpdate(lambda u, p: [torch.full_like(p, u.initial_accumulator)], _rmsprop_step),
    "adagrad": HandUpdate(lambda u, p: [torch.full_like(p, u.initial_accumulator)], _adagrad_step),
}


def _coupled_l2(model: "Model", api: str) -> float:
    """A torch user's L2 (native ``l2_regularization``): the optimizer's ``weight_decay=l2``, which adds ``l2*p`` to
    every parameter's gradient inside ``step()``; the spec's penalty then leaves the loss (``Model.l2_in_loss``)."""
    l2 = float(model.spec.loss.l2)
    if not (l2 > 0 and model.native("l2_regularization")):
        return 0.0
    model.differs("l2_regularization", f"{api}(weight_decay={l2:g}), no penalty in the loss",
                  f"L2: torch weight_decay={l2:g} adds {l2:g}*p to every parameter's gradient in step(), biases "
                  f"included, and the loss has no penalty (spec: {l2:g}*sum(kernel**2) in the loss, gradient "
                  f"2*{l2:g}*kernel)")
    return l2


def _build_sgd(model: "Model", opt: SGD, info: dict) -> None:
    form = opt.momentum_form
    if opt.momentum and form != "accumulator" and model.native("momentum_form"):
        form = "accumulator"
        model.differs("momentum_form", f"torch.optim.SGD(momentum={opt.momentum:g}{', nesterov=True' * opt.nesterov})"
                      ": buf = momentum*buf + g, p -= lr*buf",
                      "SGD momentum: torch's accumulator form (buf = mu*buf + g; p -= lr_t*buf) where the spec has "
                      "Keras' velocity form (v = mu*v - lr_t*g; p += v): equal at a constant lr, apart after it changes")
    u = Update("sgd", opt.lr, momentum=opt.momentum, nesterov=opt.nesterov, momentum_form=form,
               coupled_decay=_coupled_l2(model, "torch.optim.SGD"))
    why = ("torch.optim.SGD has only the accumulator form (buf = mu*buf + g)"
           if opt.momentum and form == "velocity" else None)
    model.use_update(u, info, "torch.optim.SGD", why_not=why, graph_ok=not opt.momentum,
                     make=lambda: torch.optim.SGD(model.params, lr=opt.lr, momentum=opt.momentum,
                                                  nesterov=opt.nesterov, weight_decay=u.coupled_decay))


def _adam_update(model: "Model", opt: Adam, cls) -> Update:
    """Adam's hyperparameters, with torch's eps (``adam_epsilon``) and its eps_v_hat form (``adam_convention``)."""
    api, eps, conv = f"torch.optim.{cls.__name__}", opt.epsilon, opt.convention
    if model.native("adam_epsilon"):
        eps = torch_defaults(cls)["eps"]
        if value_diff("eps", eps, opt.epsilon, model.options.dtype):
            model.differs("adam_epsilon", f"{api}(eps={eps:g})",
                          f"Adam: {api} default eps={eps:g} (spec: eps={opt.epsilon:g})")
    if model.native("adam_convention") and conv != "eps_v_hat":
        conv = "eps_v_hat"
        model.differs("adam_convention", f"{api}: eps added to sqrt(v_hat) (eps_v_hat)",
                      f"Adam: {api} adds eps to sqrt(v_hat) (eps_v_hat; spec: eps_hat, eps added to sqrt(v) with "
                      "the bias corrections in the step size)")
    return Update("adam", opt.lr, beta1=opt.beta1, beta2=opt.beta2, epsilon=eps, convention=conv)


def _build_adam(model: "Model", opt: Adam, info: dict) -> None:
    u = _adam_update(model, opt, torch.optim.Adam)
    u = replace(u, coupled_decay=_coupled_l2(model, "torch.optim.Adam"))
    model.use_adam(u, info, torch.optim.Adam)


def _build_adamw(model: "Model", opt: AdamW, info: dict) -> None:
    """AdamW: torch.optim.AdamW's decoupled decay ``p *= 1 - lr*wd`` (torch/optim/adam.py ``_single_tensor_adam``,
    ``decoupled_weight_decay``) before the Adam update.  No coupled L2: its ``weight_decay`` is the decay."""
    u = _adam_update(model, opt, torch.optim.AdamW)
    wd, times = opt.weight_decay, opt.decay_times_lr
    if model.native("adamw_weight_decay"):
        wd = torch_defaults(torch.optim.AdamW)["weight_decay"]
        d = value_diff("AdamW weight decay: torch.optim.AdamW default", wd, opt.weight_decay, model.options.dtype)
        if d:
            model.differs("adamw_weight_decay", f"torch.optim.AdamW(weight_decay={wd:g})", d)
    if model.native("adamw_decay_form") and not times:
        times = True
        model.differs("adamw_decay_form", "torch.optim.AdamW: p *= 1 - lr*weight_decay",
                      "AdamW: torch multiplies the decay by the learning rate (p *= 1 - lr_t*wd; spec: p -= wd*p)")
    model.use_adam(replace(u, weight_decay=wd, decay_times_lr=times), info, torch.optim.AdamW)


def _build_rmsprop(model: "Model", opt: RMSprop, info: dict) -> None:
    d = torch_defaults(torch.optim.RMSprop)
    dtype = model.options.dtype
    rho, eps, inside, v0 = opt.rho, opt.epsilon, opt.epsilon_inside_sqrt, opt.initial_accumulator
    if model.native("rmsprop_rho"):
        rho = d["alpha"]
        diff = value_diff("RMSprop decay: torch alpha", rho, opt.rho, dtype)
        if diff:
            model.differs("rmsprop_rho", f"torch.optim.RMSprop(alpha={rho:g})", diff)
    if model.native("rmsprop_epsilon"):
        eps, inside = d["eps"], False
        if value_diff("eps", eps, opt.epsilon, dtype) or opt.epsilon_inside_sqrt:
            model.differs("rmsprop_epsilon", f"torch.optim.RMSprop(eps={eps:g}): sqrt(v) + eps",
                          f"RMSprop: torch eps={eps:g} added outside the square root (spec: eps={opt.epsilon:g} "
                          f"{'inside sqrt(v + eps)' if opt.epsilon_inside_sqrt else 'outside'})")
    if model.native("rmsprop_accumulator") and v0 != 0:
        v0 = 0.0
        model.differs("rmsprop_accumulator", "torch.optim.RMSprop: square_avg starts at 0",
                      f"RMSprop: torch's square_avg starts at 0 (spec: {opt.initial_accumulator:g})")
    u = Update("rmsprop", opt.lr, rho=rho, epsilon=eps, epsilon_inside_sqrt=inside, initial_accumulator=v0,
               coupled_decay=_coupled_l2(model, "torch.optim.RMSprop"))
    why = ("torch.optim.RMSprop adds eps outside the square root" if inside else
           "torch.optim.RMSprop starts square_avg at 0" if v0 != 0 else None)
    model.use_update(u, info, "torch.optim.RMSprop", why_not=why,
                     make=lambda: torch.optim.RMSprop(model.params, lr=opt.lr, alpha=rho, eps=eps,
                                                      weight_decay=u.coupled_decay))


def _build_adagrad(model: "Model", opt: Adagrad, info: dict) -> None:
    d = torch_defaults(torch.optim.Adagrad)
    dtype = model.options.dtype
    a0, eps, inside = opt.initial_accumulator, opt.epsilon, opt.epsilon_inside_sqrt
    if model.native("adagrad_accumulator"):
        a0 = float(d["initial_accumulator_value"])
        diff = value_diff("Adagrad: torch initial_accumulator_value", a0, opt.initial_accumulator, dtype)
        if diff:
            model.differs("adagrad_accumulator", f"torch.optim.Adagrad(initial_accumulator_value={a0:g})", diff)
    if model.native("adagrad_epsilon"):
        eps, inside = d["eps"], False
        if value_diff("eps", eps, opt.epsilon, dtype) or opt.epsilon_inside_sqrt:
            model.differs("adagrad_epsilon", f"torch.optim.Adagrad(eps={eps:g}): sqrt(sum) + eps",
                          f"Adagrad: torch eps={eps:g} added outside the square root (spec: eps={opt.epsilon:g} "
                          f"{'inside sqrt(a + eps)' if opt.epsilon_inside_sqrt else 'outside'})")
    u = Update("adagrad", opt.lr, epsilon=eps, epsilon_inside_sqrt=inside, initial_accumulator=a0,
               coupled_decay=_coupled_l2(model, "torch.optim.Adagrad"))
    model.use_update(u, info, "torch.optim.Adagrad",
                     why_not="torch.optim.Adagrad adds eps outside the square root" if inside else None,
                     make=lambda: torch.optim.Adagrad(model.params, lr=opt.lr, initial_accumulator_value=a0, eps=eps,
                                                      weight_decay=u.coupled_decay))


# optimizer type (exact: AdamW is an Adam subclass and has its own entry) -> builder(model, opt, info): substitutes
# torch's defaults for the active native keys, then sets model.torch_opt (a built-in) or model.hand (hand-written)
OPTIMIZER_BUILDERS: dict[type, Callable | str] = {SGD: _build_sgd, Adam: _build_adam, AdamW: _build_adamw,
                                                  RMSprop: _build_rmsprop, Adagrad: _build_adagrad}


@dataclass(frozen=True)
class Clip:
    """The clipping a run applies: the spec's ``ClipNorm`` with torch's scope (``clip_scope``: global) and epsilon
    (``clip_epsilon``: ``torch.nn.utils.clip_grad_norm_`` itself, ``total_norm + 1e-6``) where native."""

    max_norm: float
    scope: str
    torch_eps: bool


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
        forced = options.extra.get("optimizer", "auto")
        if forced not in ("auto", "manual"):
            raise ValueError(f"extra['optimizer'] must be 'auto' or 'manual', got {forced!r}")
        self.native_mode = options.mode == "native"
        self.dev = torch.device(options.device)
        self.dtype = _DTYPES[options.dtype]
        self.np_dtype = np.dtype(options.dtype)
        if options.threads:
            torch.set_num_threads(int(options.threads))
        info: dict = {"threads": torch.get_num_threads()}
        self.native_settings: dict[str, str] = {}
        self.diffs: list[str] = []
        self.fast_graph = bool(options.fast and self.dev.type == "cuda")
        if self.dev.type == "cuda":
            if self.native("matmul_precision"):  # torch's defaults untouched (cuDNN convolutions may use TF32)
                mm, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
                if mm or cudnn:
                    self.differs("matmul_precision", f"torch.backends.cuda.matmul.allow_tf32={mm}, "
                                 f"torch.backends.cudnn.allow_tf32={cudnn}",
                                 f"TF32 left at torch defaults (matmul {mm}, cuDNN convolutions {cudnn})")
            else:  # exact float32 products (process-wide: one backend per process)
                torch.backends.cuda.matmul.allow_tf32 = False
                torch.backends.cudnn.allow_tf32 = False
            info["tf32"] = {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32}

        # -- the network, with the canonical weights and initial state converted at the edge
        self.plan = layout_plan(spec)
        self.splan = state_plan(spec)
        self.mplan = mask_plan(spec)
        layers = build_layers(spec, self.native)
        for p in places:
            if p.builder.native_diffs is not None:
                for key, setting, prose in p.builder.native_diffs(p.layer, p.in_shape, self.native, options.dtype):
                    self.differs(key, setting, prose)
        self.loss_fn, loss_diffs, self.native_sigmoid = make_loss(spec, self.native, self.dtype, self.dev)
        mods = [m for _, ms in layers for m in ms] + ([nn.Sigmoid()] if self.native_sigmoid else [])
        self.net = nn.Sequential(*mods).to(device=self.dev, dtype=self.dtype)
        self.params = list(self.net.parameters())
        self.state = [t for p, ms in layers if p.builder.state is not None for t in p.builder.state(ms[0])]
        self.native_dropout = bool(spec.random_layers) and self.native("dropout_rng")
        self.masked = [ms[0] for p, ms in layers if p.builder.masked] if not self.native_dropout else []
        with torch.no_grad():
            for ts, arrays, plan in ((self.params, to_torch_layout(self.plan, weights), self.plan),
                                     (self.state, to_torch_layout(self.splan, init_state(spec)), self.splan)):
                for p, a, lay in zip(ts, arrays, plan, strict=True):
                    assert tuple(p.shape) == lay.torch, f"{lay.name}: module tensor {tuple(p.shape)} vs {lay.torch}"
                    p.copy_(torch.from_numpy(np.asarray(a, dtype=self.np_dtype)))
        if self.native_dropout:  # native dropout draws from torch's global RNG: seeded for a reproducible run
            torch.manual_seed(int(options.seed))
        if spec.state_entries():
            bn_native = [k for k in _BN_KEYS if self.native(k)]
            info["batchnorm"] = ("nn.BatchNorm1d/2d, torch's defaults" if len(bn_native) == len(_BN_KEYS) else
                                 "torch.batch_norm on the batch's statistics (biased variance); moving statistics "
                                 "updated by hand in the spec's convention"
                                 + (f"; torch's {', '.join(bn_native)}" if bn_native else ""))
        if spec.random_layers:
            info["dropout"] = (f"nn.Dropout, torch's RNG seeded with {int(options.seed)}" if self.native_dropout else
                               "the harness's masks (step, seed)")

        # -- loss
        for key, setting, prose in loss_diffs:
            self.differs(key, setting, prose)
        self.kernels = [p for p, lay in zip(self.params, self.plan, strict=True) if lay.kind in ("dense", "conv")]

        # -- clipping, then the optimizer and its schedule
        self.clip = None
        if spec.clip is not None:
            scope = spec.clip.scope
            if self.native("clip_scope") and scope != "global":
                scope = "global"
                self.differs("clip_scope", f"torch.nn.utils.clip_grad_norm_(model.parameters(), "
                             f"max_norm={spec.clip.max_norm:g})",
                             "clipping: torch's clip_grad_norm_ scales every gradient by their global norm (spec: "
                             "each tensor by its own norm)")
            torch_eps = self.native("clip_epsilon")
            if torch_eps:
                self.differs("clip_epsilon", f"torch.nn.utils.clip_grad_norm_: max_norm / (total_norm + "
                             f"{TORCH_CLIP_EPS:g})", f"clipping: torch's clip_grad_norm_ divides max_norm by the norm "
                             f"+ {TORCH_CLIP_EPS:g} (spec: no epsilon)")
            self.clip = Clip(float(spec.clip.max_norm), scope, torch_eps)
            info["clip"] = (f"torch.nn.utils.clip_grad_norm_ ({scope})" if torch_eps else
                            f"hand-written {scope} norm clipping, min(1, max_norm/||g||)")
        self.t = 0
        # per-step scalars of the hand-written updates, set on the host before each step (or graph replay): the
        # learning rate of this update, Adam's alpha (eps_hat: lr_t*sqrt(1-b2^t)/(1-b1^t); eps_v_hat: lr_t/(1-b1^t))
        # and 1/(1-b2^t) (eps_v_hat), AdamW's decay factor (lr_t*wd or wd)
        self._lr, self._alpha, self._c2, self._decay = (torch.zeros((), dtype=self.dtype, device=self.dev)
                                                        for _ in range(4))
        self.torch_opt = None
        self.hand: HandUpdate | None = None
        self.hand_state: list[list[torch.Tensor]] = []
        self.eps_trick = False  # torch.optim.Adam with eps = eps/sqrt(1-b2^t) set per step (extra['adam'])
        self.adam_impl = None  # "torch_optim" | "manual" for an Adam; None otherwise
        build_opt(self, spec.optimizer, info)
        self.l2_in_loss = spec.loss.l2 > 0 and self.update.coupled_decay == 0
        info["loss"] = (f"{spec.loss.kind}, {spec.loss.reduction} over the batch"
                        + (" (from logits, stable)" if spec.loss.prediction != "identity" and not self.native_sigmoid
                           else "")
                        + (", class-weighted" if spec.loss.class_weights else "")
                        + (f", + {spec.loss.l2:g}*sum(kernel**2)" if self.l2_in_loss else "")
                        + "".join(f"; {s}" for _, s, _ in loss_diffs))
        self.schedule = self._native_schedule(info) if spec.schedule is not None else None
        if self.native_mode:
            diffs = list(dict.fromkeys(self.diffs))  # one line per difference, however many layers share it
            info["native_differences"] = diffs or [f"nothing differs: {info['optimizer']} and {info['loss']} compute "
                                                   "what the spec says"]
            info["native_settings"] = dict(self.native_settings)
        info["fast"] = ("CUDA graph replay of the whole step, one graph per batch shape" if self.fast_graph
                        else "no-op on CPU" if options.fast else False)
        # the settings that decide bit-reproducibility (numerics.md section 7), recorded with every row
        info["deterministic_algorithms"] = torch.are_deterministic_algorithms_enabled()
        info["num_threads"] = torch.get_num_threads()
        self._graphs: dict = {}
        self.info = info

    # -- native settings -----------------------------------------------------------------------------------------
    def differs(self, key: str, setting: str, prose: str) -> None:
        """Record that torch's default for native key ``key`` (active in this run) differs from the spec:
        ``info["native_settings"][key]`` (the torch API with its value) and a prose line."""
        have = self.native_settings.get(key)
        self.native_settings[key] = setting if have in (None, setting) else f"{have}; {setting}"
        self.diffs.append(prose)

    def _native_schedule(self, info: dict):
        """The step schedule: aligned, ``spec.lr_at(t)`` set before each update; native ``lr_schedule``: torch's
        ``StepLR(step_size=every, gamma=factor)`` stepped after every update, on the built-in optimizer or on a holder
        ``torch.optim.SGD`` whose lr the hand-written update reads."""
        sch = self.spec.schedule
        if not self.native("lr_schedule"):
            info["schedule"] = f"spec.lr_at(t) set per update (every {sch.every}, factor {sch.factor:g})"
            return None
        opt = self.torch_opt
        holder = None
        if opt is None:
            holder = opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=self.update.lr)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=int(sch.every), gamma=float(sch.factor))
        self.differs("lr_schedule", f"torch.optim.lr_scheduler.StepLR(step_size={sch.every}, gamma={sch.factor:g}) "
                     "stepped after every update",
                     f"lr schedule: torch StepLR multiplies the lr by {sch.factor:g} at every {sch.every} updates "
                     "(lr*g*g..., spec lr*g**k): equal up to rounding")
        info["schedule"] = "torch.optim.lr_scheduler.StepLR, stepped after every update" + (
            " (on a holder SGD whose lr the hand-written update reads)" if holder is not None else "")
        return opt, holder, sched

    # -- the optimizer -------------------------------------------------------------------------------------------
    def use_update(self, u: Update, info: dict, api: str, make: Callable, why_not: str | None = None,
                   graph_ok: bool = False) -> None:
        """Use the built-in ``make()`` (``api``) where it computes exactly ``u``, else the hand-written update: when
        ``why_not`` says the built-in cannot, ``extra['optimizer']='manual'`` asks for it, or CUDA-graph fast mode
        captures the step (``graph_ok``: the built-in captures, without a schedule)."""
        self.update = u
        reason = why_not
        if reason is None and self.options.extra.get("optimizer", "auto") == "manual":
            reason = "extra['optimizer']='manual'"
        if reason is None and self.fast_graph and not (graph_ok and self.spec.schedule is None):
            reason = ("CUDA-graph fast mode: the hand-written update reads lr from a device tensor (a built-in "
                      "bakes its Python-float lr into the graph)")
        if reason is None:
            self.torch_opt = make()
            info["optimizer"] = f"built-in {api}"
            return
        self._use_hand(u)
        info["optimizer"] = f"hand-written {type(self.spec.optimizer).__name__}; {reason}"

    def _use_hand(self, u: Update) -> None:
        self.update = u
        self.hand = HAND_UPDATES[u.kind]
        self.hand_state = [self.hand.state(u, p) for p in self.params]
        if u.kind == "adam":
            self._b1c = 1.0 - u.beta1  # exact: the betas are float32-representable and in [0.5, 1]
            self._b2c = 1.0 - u.beta2

    def use_adam(self, u: Update, info: dict, cls) -> None:
        """Adam / AdamW: the built-in ``cls`` (``torch.optim.Adam`` / ``AdamW``) or the hand-written update, by
        :meth:`_adam_choice`; a decay not multiplied by lr is hand-written (torch's AdamW always multiplies)."""
        self.update = u
        requested = self.options.extra.get("adam", "auto")
        if self.options.extra.get("optimizer", "auto") == "manual":
            requested = "manual"
        self.adam_impl, text = self._adam_choice(u, requested, cls.__name__)
        if self.adam_impl != "manual" and not u.decay_times_lr:
            self.adam_impl = "manual"
            text = (f"hand-written, spec convention ({u.convention}); torch.optim.AdamW multiplies its decay by lr "
                    "(spec: decay_times_lr=False)")
        info["optimizer"] = text
        if self.adam_impl == "manual":
            self._use_hand(u)
            return
        wd = {"weight_decay": u.weight_decay} if cls is torch.optim.AdamW else {"weight_decay": u.coupled_decay}
        self.eps_trick = u.convention == "eps_hat"
        self.torch_opt = cls(self.params, lr=u.lr, betas=(u.beta1, u.beta2), eps=u.epsilon,
                             capturable=self.adam_impl == "capturable", **wd)
        self.adam_impl = "torch_optim"

    def _adam_choice(self, u: Update, requested: str, name: str = "Adam") -> tuple[str, str]:
        """(implementation, ``info["optimizer"]``) of an Adam: ``"torch_optim"``, ``"capturable"`` (native, CUDA-graph
        fast mode: what a torch user captures) or ``"manual"``.

        ``requested`` (``extra["adam"]``): ``"auto"`` (the built-in wherever it follows the update exactly),
        ``"manual"`` or ``"torch_optim"`` (for eps_hat, the per-step eps trick)."""
        if requested not in ("auto", "manual", "torch_optim"):
            raise ValueError(f"extra['adam'] must be 'auto', 'manual' or 'torch_optim', got {requested!r}")
        hand = f"hand-written, spec convention ({u.convention})"
        if requested == "manual":
            return "manual", hand + ("; extra['optimizer']='manual'" if self.options.extra.get("optimizer") == "manual"
                                     else "; extra['adam']='manual'")
        if u.convention == "eps_hat":
            if requested == "auto":
                return "manual", hand + f"; torch.optim.{name} adds a constant eps to sqrt(v_hat) (eps_v_hat)"
            if self.fast_graph:
                raise Unsupported("extra['adam']='torch_optim' sets eps per step: it cannot be captured in a CUDA "
                                  "graph; use the default hand-written Adam with --fast")
            return "torch_optim", f"built-in torch.optim.{name}; eps_hat via eps = eps/sqrt(1-b2^t) set per step"
        if self.fast_graph:  # eps_v_hat
            if requested == "torch_optim":
                raise Unsupported("extra['adam']='torch_optim' with --fast on CUDA needs capturable=True, whose "
                                  "float32 step count gives float32 bias corrections; use the default with --fast")
            if self.native("adam_convention") and self.spec.schedule is None:
                return "capturable", f"built-in torch.optim.{name}(capturable=True); torch's defaults"
            return "manual", hand + (f"; CUDA-graph capture needs torch.optim.{name}(capturable=True), whose bias "
                                     "corrections come from a float32 step tensor on the device")
        return "torch_optim", f"built-in torch.optim.{name}"

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
        """Training-mode loss (with the spec's L2 penalty, unless a torch user's weight_decay replaces it) and its
        gradients (unclipped)."""
        self.net.train()
        loss = self.loss_fn(self.net(x), y)
        if self.l2_in_loss:
            loss = loss + self.spec.loss.l2 * sum((k * k).sum() for k in self.kernels)
        return loss, torch.autograd.grad(loss, self.params)

    def _lr_of_update(self, t: int) -> float:
        """The learning rate of update ``t`` (0-based): the spec's, or torch's StepLR's (native ``lr_schedule``)."""
        if self.schedule is not None:
            return float(self.schedule[0].param_groups[0]["lr"])
        return self.spec.lr_at(t) if self.spec.schedule is not None else float(self.update.lr)

    def _set_step_scalars(self, t: int) -> None:
        """Host-side per-step scalars, computed in double, before update ``t`` (1-based: the step, or graph replay,
        that uses them)."""
        u, lr = self.update, self._lr_of_update(t - 1)
        if self.torch_opt is not None:
            if self.spec.schedule is not None and self.schedule is None:  # aligned schedule: the spec's lr_t
                for g in self.torch_opt.param_groups:
                    g["lr"] = lr
            if self.eps_trick:  # eps_hat through torch.optim.Adam: eps = eps/sqrt(1-b2^t) set per step
                for g in self.torch_opt.param_groups:
                    g["eps"] = u.epsilon / math.sqrt(1.0 - u.beta2**t)
            return
        self._lr.fill_(lr)
        if u.kind == "adam":
            b1t, b2t = u.beta1**t, u.beta2**t
            if u.convention == "eps_hat":
                self._alpha.fill_(lr * math.sqrt(1.0 - b2t) / (1.0 - b1t))
            else:
                self._alpha.fill_(lr / (1.0 - b1t))
                self._c2.fill_(1.0 / (1.0 - b2t))
        if u.weight_decay:
            self._decay.fill_(lr * u.weight_decay if u.decay_times_lr else u.weight_decay)

    def _after_step(self) -> None:
        """Native ``lr_schedule``: torch's ``scheduler.step()`` after every update (the holder's no-op ``step()``
        first, as torch expects the optimizer to step before its scheduler)."""
        if self.schedule is not None:
            _, holder, sched = self.schedule
            if holder is not None:
                holder.step()
            sched.step()

    def _clip(self, grads) -> list[torch.Tensor]:
        """The spec's ``ClipNorm`` (hand-written: ``g * min(1, max_norm/||g||)`` over all gradients or each) or, for
        native ``clip_epsilon``, ``torch.nn.utils.clip_grad_norm_`` itself (``total_norm + 1e-6``).  No host sync."""
        c = self.clip
        if c is None:
            return list(grads)
        groups = [list(range(len(grads)))] if c.scope == "global" else [[i] for i in range(len(grads))]
        if c.torch_eps:
            for p, g in zip(self.params, grads):
                p.grad = g
            for grp in groups:
                torch.nn.utils.clip_grad_norm_([self.params[i] for i in grp], c.max_norm)
            return [p.grad for p in self.params]
        out = list(grads)
        for grp in groups:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(grads[i]) for i in grp]))
            coef = torch.clamp(c.max_norm / norm, max=1.0)
            for i in grp:
                out[i] = grads[i] * coef
        return out

    @torch.no_grad()
    def _apply(self, grads) -> None:
        if self.torch_opt is not None:
            for p, g in zip(self.params, grads):
                p.grad = g
            self.torch_opt.step()
            return
        u = self.update
        for p, g, s in zip(self.params, grads, self.hand_state, strict=True):
            if u.coupled_decay:  # a torch user's L2: weight_decay adds wd*p to the gradient
                g = g.add(p, alpha=u.coupled_decay)
            if u.weight_decay:  # AdamW: p -= lr_t*wd*p (or wd*p) before the Adam update
                p.sub_(p * self._decay)
            self.hand.step(self, u, p, g, s)

    def _step_body(self, x, y) -> torch.Tensor:
        loss, grads = self._loss_grads(x, y)
        self._apply(self._clip(grads))
        return loss.detach()

    def _step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One update; returns the loss before it as a 0-d device tensor (no host sync)."""
        masks = self._masks(self.t, x.shape[0])  # step t: the updates applied before this one
        self.t += 1
        self._set_step_scalars(self.t)
        if self.fast_graph:
            loss = self._replay(x, y, masks)
        else:
            self._set_masks(masks)
            loss = self._step_body(x, y)
        self._after_step()
        return loss

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
            ts += [t for s in self.hand_state for t in s]
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
        """Training mode at step t's masks; the gradients of the loss (+ L2), unclipped; the module buffers
        (BatchNorm state) are restored afterwards."""
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

    def gpu_peak_mb(self) -> float | None:
        """Peak MiB that torch's caching allocator has handed to tensors on the model's CUDA device in this process
        (``torch.cuda.max_memory_allocated(device)``: allocated, not reserved; never reset here, so it covers every
        model this process built on that device); None on the CPU."""
        if self.dev.type != "cuda":
            return None
        return to_mib(torch.cuda.max_memory_allocated(self.dev))
