"""PyTorch eager: an ``nn.Module`` built from the spec (``nn.Linear``, ``nn.Conv2d``, ``nn.MaxPool2d``, ``nn.Flatten``).

Layout: torch keeps ``Linear.weight`` as ``(out, in)``, conv weights as OIHW, images as NCHW and flattens in
(c, h, w) order.  All conversion happens at the edge, in one place (:func:`layout_plan`, :func:`to_torch_layout`,
:func:`from_torch_layout`, :meth:`Model._x`), both ways, with shape asserts:

* dense kernel ``(in, out)`` -> ``W.T``; conv kernel HWIO -> OIHW (``transpose(3, 2, 0, 1)``); biases as they are;
* inputs NHWC -> NCHW (only for image inputs);
* the first dense kernel after a Flatten of an (h, w, c) activation has its rows permuted from (h, w, c) to (c, h, w)
  order before the transpose (and back in ``get_weights`` / ``gradients``).  Without it nothing raises: only the
  numbers differ.

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
* CUDA: TF32 off for matmuls and cuDNN convolutions (torch's default lets cuDNN use TF32).
* Max-pooling routes the gradient to the first maximum of each window on CPU and CUDA, like the NumPy oracle.

Native mode: built-in ``torch.optim.Adam`` with its defaults (eps 1e-8 added to ``sqrt(v_hat)``), the losses a torch user
writes (``nn.Sigmoid`` + ``nn.BCELoss`` on probabilities, which clamps log at -100; ``nn.CrossEntropyLoss``;
``nn.MSELoss``), TF32 left at torch's defaults; ``info["native_differences"]`` lists what differs from the spec.

Fast mode: on CUDA the whole step (forward, loss, backward, update) is captured once per batch shape in a CUDA graph
and replayed; on CPU it is a no-op (noted in ``info``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.spec import SGD, Adam, Conv2D, Dense, Flatten, MaxPool2D, ModelSpec

from .base import BuildOptions, Capabilities, ModelBase, Unsupported

CAPABILITIES = Capabilities(
    devices=("cpu", "cuda"),
    notes=("canonical weights converted at the edge: Linear W.T, conv HWIO->OIHW, NHWC->NCHW, flatten rows (h,w,c)"
           "->(c,h,w)", "aligned Adam: built-in torch.optim.Adam for eps_v_hat, hand-written for eps_hat (and for both "
           "in CUDA-graph fast mode)", "fast mode = CUDA graph replay"),
)

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def probe() -> str:
    return torch.__version__


def devices() -> list[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


# --------------------------------------------------------------------------------------- layout: the one edge
@dataclass(frozen=True)
class ParamLayout:
    """How one canonical parameter maps onto its torch tensor."""

    name: str
    kind: str  # "dense" | "conv" | "bias"
    canonical: tuple[int, ...]  # canonical shape
    torch: tuple[int, ...]  # torch shape
    rows: tuple[int, ...] | None = None  # dense after a flatten: canonical row of each torch input feature


def flatten_rows(h: int, w: int, c: int) -> np.ndarray:
    """For torch's (c, h, w) flatten order, the index of each feature in the canonical (h, w, c) order."""
    return np.arange(h * w * c).reshape(h, w, c).transpose(2, 0, 1).ravel()


def layout_plan(spec: ModelSpec) -> list[ParamLayout]:
    """The conversion of every parameter, in ``spec.param_names()`` order."""
    plan: list[ParamLayout] = []
    names = iter(spec.param_names())
    shape = tuple(spec.input_shape)
    rows = None  # set by a Flatten of an (h, w, c) activation, consumed by the next Dense
    for layer, out_shape in zip(spec.layers, spec.shapes()):
        if isinstance(layer, Flatten) and len(shape) == 3:
            rows = tuple(int(i) for i in flatten_rows(*shape))
        elif isinstance(layer, Dense):
            n_in, n_out = shape[0], layer.units
            plan.append(ParamLayout(next(names), "dense", (n_in, n_out), (n_out, n_in), rows))
            plan.append(ParamLayout(next(names), "bias", (n_out,), (n_out,)))
            rows = None
        elif isinstance(layer, Conv2D):
            (kh, kw), c, f = layer.kernel_size, shape[2], layer.filters
            plan.append(ParamLayout(next(names), "conv", (kh, kw, c, f), (f, c, kh, kw)))
            plan.append(ParamLayout(next(names), "bias", (f,), (f,)))
        shape = out_shape
    return plan


def to_torch_layout(plan: list[ParamLayout], weights: list[np.ndarray]) -> list[np.ndarray]:
    """Canonical arrays -> arrays shaped and ordered as the torch parameters."""
    out = []
    for p, w in zip(plan, weights, strict=True):
        w = np.asarray(w)
        assert w.shape == p.canonical, f"{p.name}: canonical shape {w.shape}, expected {p.canonical}"
        if p.kind == "dense":
            t = (w if p.rows is None else w[list(p.rows)]).T  # rows (h,w,c) -> (c,h,w), then (in,out) -> (out,in)
        elif p.kind == "conv":
            t = w.transpose(3, 2, 0, 1)  # HWIO -> OIHW
        else:
            t = w
        assert t.shape == p.torch, f"{p.name}: torch shape {t.shape}, expected {p.torch}"
        out.append(np.ascontiguousarray(t))
    return out


def from_torch_layout(plan: list[ParamLayout], arrays: list[np.ndarray]) -> list[np.ndarray]:
    """Arrays shaped as the torch parameters -> canonical layout (the exact inverse of :func:`to_torch_layout`)."""
    out = []
    for p, t in zip(plan, arrays, strict=True):
        t = np.asarray(t)
        assert t.shape == p.torch, f"{p.name}: torch shape {t.shape}, expected {p.torch}"
        if p.kind == "dense":
            w = t.T
            if p.rows is not None:
                inv = np.empty(len(p.rows), dtype=np.intp)
                inv[list(p.rows)] = np.arange(len(p.rows))
                w = w[inv]
        elif p.kind == "conv":
            w = t.transpose(2, 3, 1, 0)  # OIHW -> HWIO
        else:
            w = t
        assert w.shape == p.canonical, f"{p.name}: canonical shape {w.shape}, expected {p.canonical}"
        out.append(np.ascontiguousarray(w))
    return out


# ------------------------------------------------------------------------------------------------- the network
_ACTS = {"linear": None, "sigmoid": nn.Sigmoid, "relu": nn.ReLU}


def build_module(spec: ModelSpec, final_sigmoid: bool = False) -> nn.Sequential:
    """The spec as an ``nn.Sequential``; parameters come out in ``spec.param_names()`` order (weight, bias, ...)."""
    mods: list[nn.Module] = []
    shape = tuple(spec.input_shape)
    for layer, out_shape in zip(spec.layers, spec.shapes()):
        if isinstance(layer, Dense):
            mods.append(nn.Linear(shape[0], layer.units))
        elif isinstance(layer, Conv2D):
            mods.append(nn.Conv2d(shape[2], layer.filters, tuple(layer.kernel_size), stride=1, padding=0))
        elif isinstance(layer, MaxPool2D):
            mods.append(nn.MaxPool2d(layer.pool_size, stride=layer.pool_size))
        elif isinstance(layer, Flatten):
            mods.append(nn.Flatten())
        if isinstance(layer, (Dense, Conv2D)) and _ACTS[layer.activation] is not None:
            mods.append(_ACTS[layer.activation]())
        shape = out_shape
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


# --------------------------------------------------------------------------------------------------- the model
class Model(ModelBase):
    capabilities = CAPABILITIES

    def __init__(self, spec: ModelSpec, weights: list[np.ndarray], options: BuildOptions) -> None:
        super().__init__(spec, weights, options)
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

        # -- the network, with the canonical weights converted at the edge
        self.plan = layout_plan(spec)
        self.native_sigmoid = self.native and spec.loss.kind == "binary_crossentropy"
        self.net = build_module(spec, final_sigmoid=self.native_sigmoid).to(device=self.dev, dtype=self.dtype)
        self.params = list(self.net.parameters())
        with torch.no_grad():
            for p, a, lay in zip(self.params, to_torch_layout(self.plan, weights), self.plan, strict=True):
                assert tuple(p.shape) == lay.torch, f"{lay.name}: module parameter {tuple(p.shape)} vs {lay.torch}"
                p.copy_(torch.from_numpy(np.asarray(a, dtype=self.np_dtype)))

        # -- loss
        if self.native:
            self.loss_fn, loss_diffs = native_loss(spec)
            diffs += loss_diffs
            info["loss"] = type(self.loss_fn).__name__ + (" after nn.Sigmoid" if self.native_sigmoid else "")
        else:
            self.loss_fn = aligned_loss(spec)
            info["loss"] = f"{spec.loss.kind} from logits (stable), {spec.loss.reduction} over the batch"

        # -- optimizer
        opt = spec.optimizer
        self.t = 0
        self.fast_graph = bool(options.fast and self.dev.type == "cuda")
        # Adam's per-step scalars, set on the host before each step (or graph replay): eps_hat: alpha_t =
        # lr*sqrt(1-b2^t)/(1-b1^t) in _alpha; eps_v_hat: lr/(1-b1^t) in _alpha and 1/(1-b2^t) in _c2
        self._alpha = torch.zeros((), dtype=self.dtype, device=self.dev)
        self._c2 = torch.zeros((), dtype=self.dtype, device=self.dev)
        self.adam_impl = None
        self.torch_opt = None
        if isinstance(opt, SGD):
            self.torch_opt = torch.optim.SGD(self.params, lr=opt.lr)
            info["optimizer"] = "built-in torch.optim.SGD"
        elif self.native:
            self.torch_opt = torch.optim.Adam(self.params, lr=opt.lr, betas=(opt.beta1, opt.beta2),
                                              capturable=self.fast_graph)
            eps0 = self.torch_opt.param_groups[0]["eps"]
            info["optimizer"] = f"built-in torch.optim.Adam; torch's defaults (eps={eps0:g}, eps_v_hat)"
            if not (opt.convention == "eps_v_hat" and opt.epsilon == eps0):
                diffs.append(f"Adam: torch.optim.Adam default eps={eps0:g} added to sqrt(v_hat) (spec: "
                             f"eps={opt.epsilon:g}, {opt.convention} convention)")
        else:
            self.adam_impl, info["optimizer"] = self._adam_choice(opt, options.extra.get("adam", "auto"))
            if self.adam_impl == "torch_optim":
                self.torch_opt = torch.optim.Adam(self.params, lr=opt.lr, betas=(opt.beta1, opt.beta2),
                                                  eps=opt.epsilon)
            else:
                self.m = [torch.zeros_like(p) for p in self.params]
                self.v = [torch.zeros_like(p) for p in self.params]
                self._b1c = 1.0 - opt.beta1  # exact: the betas are float32-representable and in [0.5, 1]
                self._b2c = 1.0 - opt.beta2
        if self.native:
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

    def _canonical(self, tensors) -> list[np.ndarray]:
        # copy: on CPU .numpy() shares memory with the live parameter, which the next step changes in place
        return from_torch_layout(self.plan, [t.detach().cpu().numpy().copy() for t in tensors])

    # -- one step ------------------------------------------------------------------------------------------------
    def _loss_grads(self, x, y):
        loss = self.loss_fn(self.net(x), y)
        return loss, torch.autograd.grad(loss, self.params)

    def _set_step_scalars(self, t: int) -> None:
        """Host-side per-step scalars, computed in double, before the step (or graph replay) that uses them."""
        opt = self.spec.optimizer
        if not isinstance(opt, Adam) or self.native:
            return
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
        self.t += 1
        self._set_step_scalars(self.t)
        if self.fast_graph:
            return self._replay(x, y)
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
        ts = list(self.params)
        if self.torch_opt is not None:
            for p in self.params:
                ts += [v for v in self.torch_opt.state.get(p, {}).values() if torch.is_tensor(v)]
        else:
            ts += self.m + self.v
        return ts

    def _replay(self, x, y) -> torch.Tensor:
        key = (tuple(x.shape), tuple(y.shape))
        if key not in self._graphs:
            self._capture(key, x, y)
        graph, sx, sy, sloss = self._graphs[key]
        sx.copy_(x)
        sy.copy_(y)
        graph.replay()
        return sloss.clone()

    def _capture(self, key, x, y) -> None:
        """Warm up on a side stream (then restore every parameter and optimizer state), capture one step."""
        sx, sy = x.clone(), y.clone()
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
        self._graphs[key] = (graph, sx, sy, sloss)

    # -- the rest of the contract --------------------------------------------------------------------------------
    def gradients(self, x, y):
        loss, grads = self._loss_grads(self._x(x), self._y(y))
        return float(loss.detach()), self._canonical(grads)

    @torch.no_grad()
    def predict(self, x):
        out = self.net(self._x(x))
        pred = self.spec.loss.prediction
        if pred == "sigmoid" and not self.native_sigmoid:
            out = torch.sigmoid(out)
        elif pred == "softmax":
            out = torch.softmax(out, dim=-1)
        return out.cpu().numpy()

    def get_weights(self):
        return self._canonical(self.params)

    def sync(self) -> None:
        if self.dev.type == "cuda":
            torch.cuda.synchronize(self.dev)
