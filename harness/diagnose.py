"""Diagnosis: *why* a row parts from the spec, not only where.

A failing row says where it first leaves its bound.  The diagnosis then tests named hypotheses - the mistakes real
ports make (``HYPOTHESES``) - against the NumPy oracle: each hypothesis proposes one or a few concrete changes to the
spec's computation (a candidate: "the loss summed over the batch", "Adam's epsilon 1e-6", "dense0/kernel used
transposed"), the oracle is run again *with that change* in float64, in this process, from the row's initial weights on
the row's batches (never the backend again: the oracle is cheap), and the row is measured against that changed oracle
with the very bounds of its verdict (``agreement.Reference``: the same floors and rounding envelope, in the row's dtype).
A hypothesis **explains** the row when every compared check lies within its bound of the changed oracle; it is reported
as a probable cause when it explains the row, or brings its worst error down at least ``IMPROVEMENT`` times.

What keeps it cheap and honest:

* a hypothesis says which early observations its change leaves alone (``keeps``): one that keeps the step-0 gradients
  is not tried on a row whose step-0 gradients fail (it could not explain them), so a row pays for a handful of reruns;
* two stages: every candidate is first rerun over the steps up to the row's first failure (at least steps 0 and 1);
  only those that explain the row there are rerun over the whole horizon, at least ``MIN_HORIZON`` steps (so that a
  change that grows with the step, Adam's epsilon convention, say, is told from a constant one); where none explains
  it, the ``CLOSEST`` few of the first stage are, so that the "closest" ones are compared on the same checks;
* parameters are estimated from the row where one number says it (the ratio of the first updates for a learning rate,
  Adam's epsilon from the first update, a weight decay), and searched on a short grid otherwise (a decay rate);
* ranking: hypotheses that explain the row first, by their typical error (the mean over the checks, in units of the
  bound: a systematic mistake shows in many checks, noise in a few), then the others by their worst error;
  "float32 computation inside a float64 run" is judged against the float32 rounding envelope, reported only where it
  explains the row there, and ranks after every hypothesis that explains the row at float64's own bounds.

The diagnosis is part of the row (``row["diagnosis"]``: raw JSON, the console, the generated tables) and never changes
its status: a fail stays a fail.  ``harness selftest`` measures it: every planted bug (``harness.mutants``) must be
named by its own cause (``mutants.CAUSE``) as the first hypothesis.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Callable

import numpy as np

from backends import numpy_scratch as oracle
from models.spec import Adam, AdamW, BatchNorm, Conv2D, Dense, Flatten, ModelSpec, f32

from . import agreement

MIN_HORIZON = 11  # rerun at least steps 0..10: the row's weights after 10 updates tell growing changes from constant
IMPROVEMENT = 3.0  # a hypothesis that does not explain the row is reported when it cuts the worst error this much
MAX_RERUNS = 48  # per row: the candidates beyond it are not tried (said in the diagnosis)
SHOWN = 3
CLOSEST = 6  # where nothing explains a row, the closest candidates of the short first stage run again in full


# --------------------------------------------------------------------------------------------- the changed oracle
def unchecked(obj, **changes):
    """A copy of a frozen spec object with ``changes``, without its validation: a hypothesis may need a value no spec
    may hold (an epsilon that is not a float32 number, a momentum in the other convention)."""
    new = copy.copy(obj)
    for k, v in changes.items():
        object.__setattr__(new, k, v)
    return new


class HypModel(oracle.Model):
    """The NumPy oracle with the knobs of one candidate (each a mistake a port makes), float64, plain rounding.

    Knobs: ``edge`` {j: (into, back)}: tensor j is held in another layout (a transposed kernel, a flatten order),
    ``into`` applied to the initial weights, ``back`` to what is reported; ``scale`` c: loss and gradients times c;
    ``sign`` {j}: those gradients negated; ``softmax_axis`` "consistent" | "formula": softmax over the batch axis;
    ``frozen`` {j}: never updated; ``lr_factor`` r: every update r times; ``decay`` g (and ``decay_f32``): the learning
    rate of update t is lr * g**t; ``weight_decay`` lam: w -= lam * w after each update; ``adam``: {"offset": k,
    "no_bias": bool, "v_after": k, "reset": bool}; ``reset``: optimizer state re-created before every update;
    ``shift`` k: trains on the batch k steps back; ``unscaled_dropout``; ``predict_training``."""

    def __init__(self, spec, weights, options, knobs):
        self.k = knobs
        edge = knobs.get("edge", {})
        weights = [edge[j][0](np.asarray(w)) if j in edge else w for j, w in enumerate(weights)]
        super().__init__(spec, weights, options)
        self.base_spec = spec
        self.queue: list = []

    # -- forward and gradients
    def _loss(self, out, y):
        mode = self.k.get("softmax_axis")
        if mode is None:
            return oracle.loss_and_grad(self.xp, self.spec, out, y)
        n = out.shape[0]
        z = out - out.max(axis=0, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=0, keepdims=True))  # log-softmax over the batch axis
        rows = np.arange(n)
        loss = -logp[rows, y].mean()
        p = np.exp(logp)
        onehot = np.zeros_like(out)
        onehot[rows, y] = 1.0
        if mode == "consistent":  # the true gradient of that loss
            grad = (p * onehot.sum(axis=0, keepdims=True) - onehot) / n
        else:  # the textbook formula p - onehot with the wrong softmax
            grad = (p - onehot) / n
        return loss, grad

    def _loss_grads(self, x, y):
        ctx = self._ctx(len(x))
        out, caches = oracle.forward(self.xp, self.spec, self.params, x, keep=True, state=self.state, training=True,
                                     ctx=ctx)
        loss, dout = self._loss(out, y)
        c = self.k.get("scale")
        if c is not None:
            loss, dout = loss * c, dout * c
        g = self.k.get("grad_scale")
        grads = oracle.backward(self.xp, self.spec, self.params, caches, dout if g is None else dout * g, ctx=ctx)
        loss = self._add_l2(loss, grads)
        for j in self.k.get("sign", ()):
            grads[j] = -grads[j]
        return loss, grads, ctx.new_state

    def _ctx(self, batch_size):
        ctx = super()._ctx(batch_size)
        if self.k.get("unscaled_dropout"):
            ctx.masks = {i: (m != 0).astype(m.dtype) for i, m in ctx.masks.items()}
        return ctx

    def _predict(self, x, training):
        if self.k.get("softmax_axis") is not None:
            x = np.asarray(x, dtype=self.dtype)
            out, _ = oracle.forward(self.xp, self.spec, self.params, x, state=self.state, training=False,
                                    ctx=oracle._Ctx(self.xp))
            e = np.exp(out - out.max(axis=0, keepdims=True))
            return e / e.sum(axis=0, keepdims=True)
        return super()._predict(x, training or bool(self.k.get("predict_training")))

    def predict(self, x):
        return self._predict(x, training=False)

    # -- training
    def train_step(self, x, y):
        k = self.k.get("shift")
        if k:
            self.queue.append((np.array(x), np.array(y)))
            x, y = self.queue[max(0, len(self.queue) - 1 - k)]
            self.queue = self.queue[-(k + 1):]
        return super().train_step(x, y)

    def _apply(self, grads):
        k = self.k
        frozen = k.get("frozen", ())
        grads = [np.zeros_like(g) if j in frozen else g for j, g in enumerate(grads)]
        opt = self.base_spec.optimizer
        lr = float(opt.lr) * k.get("lr_factor", 1.0)
        if "decay" in k:  # lr * g^t, or in Keras' ExponentialDecay form lr * rate^(t / steps)
            rate, steps = k.get("decay_form", (k["decay"], 1))
            lr = lr * rate ** (self.t / steps)
            lr = f32(lr) if k.get("decay_f32") else lr
        self.spec = unchecked(self.base_spec, optimizer=unchecked(opt, lr=lr))
        if k.get("reset"):  # a new optimizer before every update: zero moments, Adam's t back to 1
            for a in (*self.m, *self.v):
                a[...] = 0
        if isinstance(opt, Adam) and ("adam" in k or k.get("reset")):
            self.t += 1
            self._adam(oracle.clip_gradients(self.xp, self.spec, grads), {**k.get("adam", {}),
                                                                          "reset": bool(k.get("reset"))})
        else:
            if k.get("reset") and hasattr(opt, "initial_accumulator"):
                saved_t, self.t = self.t, 0  # RMSprop / Adagrad start their accumulator at t == 1
                super()._apply(grads)
                self.t = saved_t + 1
            else:
                super()._apply(grads)
        lam = k.get("weight_decay")
        if lam:
            for p in self.params:
                p -= lam * p

    def _adam(self, grads, a):
        """Adam (and AdamW's decay) with a bias correction ``offset`` steps off, none, a second moment that stops
        after update ``v_after``, or state re-created every update."""
        opt, xp = self.spec.optimizer, self.xp
        lr = float(opt.lr)
        if isinstance(opt, AdamW):
            decay = float(opt.weight_decay) * (lr if opt.decay_times_lr else 1.0)
            for p in self.params:
                p -= decay * p
        b1, b2, eps = np.float64(opt.beta1), np.float64(opt.beta2), np.float64(opt.epsilon)  # 1/0 -> inf, no raise
        t = 1 if a.get("reset") else self.t + a.get("offset", 0)
        b1t, b2t = (np.float64(0), np.float64(0)) if a.get("no_bias") else (b1 ** t, b2 ** t)
        late = bool(a.get("after")) and self.t > a["after"]
        for p, m_, v_, g in zip(self.params, self.m, self.v, grads):
            m = m_ + (g - m_) * (1 - b1)
            v = v_ + (g * g - v_) * (1 - b2)
            if late and a.get("kind") == "not_updated":  # the stale moment is used as it is
                m, v = (m_ if "m" in a["which"] else m), (v_ if "v" in a["which"] else v)
            if not (late and "m" in a.get("which", "")):  # stored unless it is not written back
                m_[...] = m
            if not (late and "v" in a.get("which", "")):
                v_[...] = v
            if opt.convention == "eps_hat":
                p -= (m * (lr * np.sqrt(1 - b2t) / (1 - b1t))) / (xp.sqrt(v) + eps)
            else:
                p -= lr * (m / (1 - b1t)) / (xp.sqrt(v / (1 - b2t)) + eps)

    # -- the edge: what is reported is in the canonical layout
    def _edge_out(self, j, a):
        edge = self.k.get("edge", {})
        return edge[j][1](a) if j in edge else a

    def gradients(self, x, y):
        loss, grads = super().gradients(x, y)
        return loss, [self._edge_out(j, g) for j, g in enumerate(grads)]

    def get_weights(self):
        return [self._edge_out(j, w) for j, w in enumerate(super().get_weights())]


# ------------------------------------------------------------------------------------------------------ hypotheses
@dataclass
class Candidate:
    label: str  # the concrete change, as the diagnosis prints it
    knobs: dict = field(default_factory=dict)
    spec: ModelSpec | None = None  # a changed spec (None: the row's)
    note: str = ""  # direct evidence measured on the row, printed with it


@dataclass(frozen=True)
class Hypothesis:
    id: str
    title: str
    keeps: frozenset  # early observations the change leaves alone: forward0, loss0, grads0, w1, state1
    candidates: Callable[["Context"], list[Candidate]]


@dataclass
class Context:
    spec: ModelSpec
    dtype: str
    batch_size: int
    arrays: dict  # the row's
    ref: agreement.Reference
    init: list[np.ndarray]  # the row's initial weights (canonical, float64)
    failing_w1: bool = False  # the weights after the first update fail

    def pair(self, quantity, step):
        """[(row tensor, oracle tensor)] of one quantity at one step, every parameter (None where missing)."""
        names = self.spec.param_names()
        obs = agreement.observations(self.spec, self.arrays)
        out = [(obs.get((quantity, step, n)), self.ref.obs.get((quantity, step, n))) for n in names]
        return None if any(a is None or b is None for a, b in out) else out


def _nice(x: float) -> list[float]:
    """``x`` and, where it is within 1% of one, the value with one or two significant digits (a typed constant), and
    that value rounded to float32 (where a framework stores it so)."""
    out = [x]
    if x > 0 and math.isfinite(x):
        for digits in (1, 2):
            e = math.floor(math.log10(x)) - digits + 1
            v = round(x / 10 ** e) * 10 ** e
            if abs(v - x) <= 0.01 * x:
                out += [v, f32(v)]
                break
    seen: list[float] = []
    for v in out:
        if not any(v == s for s in seen):
            seen.append(v)
    return seen


def _ratio(a, b) -> float:
    """The least-squares factor r with a ~ r * b."""
    a, b = np.concatenate([np.ravel(x) for x in a]), np.concatenate([np.ravel(x) for x in b])
    den = float(b @ b)
    return float(a @ b) / den if den > 0 else float("nan")


def _spread(a, b, r) -> float:
    """max |a - r b| / max |r b|: how constant the ratio is."""
    a, b = np.concatenate([np.ravel(x) for x in a]), np.concatenate([np.ravel(x) for x in b])
    scale = float(np.max(np.abs(r * b))) if b.size else 0.0
    return float(np.max(np.abs(a - r * b))) / scale if scale > 0 else float("inf")


def _gradient_ratio_note(ctx: Context) -> str:
    pairs = ctx.pair("grads", 0)
    if not pairs:
        return ""
    a, b = [x for x, _ in pairs], [y for _, y in pairs]
    r = _ratio(a, b)
    return f"every step-0 gradient is {r:.6g} times the spec's (+- {_spread(a, b, r):.1e})"


def _reduction(ctx):
    if ctx.batch_size == 1:
        return []  # the sum and the mean of one sample are one number
    other = "sum" if ctx.spec.loss.reduction == "mean" else "mean"
    spec = unchecked(ctx.spec, loss=unchecked(ctx.spec.loss, reduction=other))
    what = (f"the loss summed over the batch where the spec says mean (gradients {ctx.batch_size}x)" if other == "sum"
            else f"the loss averaged over the batch where the spec says sum (gradients 1/{ctx.batch_size})")
    return [Candidate(what, spec=spec, note=_gradient_ratio_note(ctx))]


def _loss_factor(ctx):
    """The loss and its gradient times 2 or 1/2, or the gradient alone off by a constant (the 2 of d(x^2)/dx dropped,
    or another factor the step-0 gradients show)."""
    note = _gradient_ratio_note(ctx)
    out = [Candidate("the loss and its gradient twice the spec's (a squared error's 1/2 left out, or a 2 too many)",
                     {"scale": 2.0}, note=note),
           Candidate("the loss and its gradient half the spec's (a 1/2 the spec does not have)", {"scale": 0.5},
                     note=note)]
    factors = [2.0, 0.5]
    pairs = ctx.pair("grads", 0)
    if pairs:
        r = _ratio([a for a, _ in pairs], [b for _, b in pairs])
        if math.isfinite(r) and r > 0 and abs(r - 1) > 1e-6:
            factors += [v for v in _nice(r) if v not in factors]
    for c in factors:
        out.append(Candidate(f"the gradient {c:.6g} times the spec's, the loss right (a factor of the loss's "
                             f"derivative dropped or doubled)", {"grad_scale": c}, note=note))
    return out


def _gradient_sign(ctx):
    pairs = ctx.pair("grads", 0)
    if not pairs:
        return []
    names = ctx.spec.param_names()
    flipped = [j for j, (a, b) in enumerate(pairs)
               if np.any(b) and np.max(np.abs(a + b)) < 0.1 * np.max(np.abs(a - b))]
    if not flipped:
        return []
    return [Candidate(f"the sign of the gradient of {', '.join(names[j] for j in flipped)} flipped",
                      {"sign": frozenset(flipped)},
                      note=f"step-0 gradient of {names[flipped[0]]}: the spec's times "
                           f"{_ratio([pairs[flipped[0]][0]], [pairs[flipped[0]][1]]):.6g}")]


def _transpose(a):
    return np.ascontiguousarray(a.T)


def _swap_hw(a):
    return np.ascontiguousarray(a.transpose(1, 0, 2, 3))


def _swap_io(a):
    return np.ascontiguousarray(a.transpose(0, 1, 3, 2))


def _flip(a):
    return np.ascontiguousarray(a[::-1, ::-1])


def _kernel_layout(ctx):
    out = []
    for j, (name, shape) in enumerate(zip(ctx.spec.param_names(), ctx.spec.param_shapes())):
        if not name.endswith("/kernel"):
            continue
        if len(shape) == 2 and shape[0] == shape[1]:
            out.append(Candidate(f"{name} ({shape[0]}x{shape[1]}) used transposed ((out, in) read as (in, out))",
                                 {"edge": {j: (_transpose, _transpose)}}))
        if len(shape) == 4:
            if shape[0] == shape[1] > 1:
                out.append(Candidate(f"{name} with its two spatial axes swapped (HWIO read as WHIO: a (3, 2, 1, 0) "
                                     f"permute where (2, 3, 1, 0) was meant)", {"edge": {j: (_swap_hw, _swap_hw)}}))
            if shape[0] > 1 or shape[1] > 1:
                out.append(Candidate(f"{name} flipped in space (a convolution where the spec cross-correlates)",
                                     {"edge": {j: (_flip, _flip)}}))
            if shape[2] == shape[3]:
                out.append(Candidate(f"{name} with input and output channels swapped",
                                     {"edge": {j: (_swap_io, _swap_io)}}))
    return out


def _flatten_order(ctx):
    spec = ctx.spec
    shapes = spec.input_shapes()
    out = []
    entries = spec.param_entries()
    for i, layer in enumerate(spec.layers):
        if not isinstance(layer, Flatten) or len(shapes[i]) != 3:
            continue
        h, w, c = shapes[i]
        if c == 1 or h * w == 1:
            continue
        dense = next((k for k in range(i + 1, len(spec.layers)) if isinstance(spec.layers[k], Dense)), None)
        j = next((j for j, (li, _, p) in enumerate(entries) if li == dense and p.role == "kernel"), None)
        if j is None:
            continue
        # canonical flat index (h, w, c) -> the (c, h, w) flat index whose kernel row the port uses there
        hh, ww, cc = np.meshgrid(np.arange(h), np.arange(w), np.arange(c), indexing="ij")
        perm = (cc * h * w + hh * w + ww).ravel()
        inv = np.argsort(perm)
        out.append(Candidate(f"Flatten (layer {i}) in (c, h, w) order where the canonical layout is (h, w, c): the "
                             f"next Dense's kernel rows meet the wrong features",
                             {"edge": {j: (lambda a, p=perm: a[p], lambda a, q=inv: a[q])}}))
    return out


def _frozen(ctx):
    pairs = ctx.pair("weights", 1)
    if not pairs or len(ctx.init) != len(pairs):
        return []
    names = ctx.spec.param_names()
    dt = np.dtype(ctx.dtype)
    frozen = [j for j, ((a, b), w0) in enumerate(zip(pairs, ctx.init))
              if np.array_equal(a, w0.astype(dt).astype(np.float64)) and not np.array_equal(b, w0)]
    if not frozen:
        return []
    return [Candidate(f"{', '.join(names[j] for j in frozen)} never updated (frozen: left out of the optimizer, or "
                      f"requires_grad / trainable off)", {"frozen": frozenset(frozen)},
                      note=f"after the first update {len(frozen)} tensor(s) still hold their initial values exactly")]


def _updates(ctx):
    pairs = ctx.pair("weights", 1)
    if not pairs or len(ctx.init) != len(pairs):
        return None
    return [a - w for (a, _), w in zip(pairs, ctx.init)], [b - w for (_, b), w in zip(pairs, ctx.init)]


def _learning_rate(ctx):
    up = _updates(ctx)
    if up is None:
        return []
    r = _ratio(*up)
    if not (r > 0 and math.isfinite(r)) or abs(r - 1) < 1e-6:
        return []
    lr = float(ctx.spec.optimizer.lr)
    note = f"the first update is {r:.6g} times the spec's (+- {_spread(*up, r):.1e})"
    return [Candidate(f"learning rate {v:.6g} where the spec says {lr:.6g}", {"lr_factor": v / lr}, note=note)
            for v in _nice(lr * r)]


def _adam(ctx):
    return isinstance(ctx.spec.optimizer, Adam)


def _adam_epsilon(ctx):
    if not _adam(ctx):
        return []
    opt = ctx.spec.optimizer
    up, g0 = _updates(ctx), ctx.pair("grads", 0)
    values: list[float] = []
    if up is not None and g0 is not None and not isinstance(opt, AdamW):
        # the first Adam update is -lr * g / (|g| + e'), e' = eps / sqrt(1 - beta2) (eps_hat) or eps (eps_v_hat)
        u = np.concatenate([np.ravel(a) for a in up[0]])
        g = np.concatenate([np.ravel(a) for a, _ in g0])
        ok = (np.abs(u) > 0) & (np.abs(g) > 0)
        e = float(opt.lr) * np.abs(g[ok]) / np.abs(u[ok]) - np.abs(g[ok])
        e = e[e > 1e-3 * np.abs(g[ok])]  # where epsilon is not lost in |g|
        if e.size:
            est = float(np.median(e)) * (math.sqrt(1 - float(opt.beta2)) if opt.convention == "eps_hat" else 1.0)
            values = [v for v in _nice(est) if not math.isclose(v, float(opt.epsilon), rel_tol=1e-6)]
    if not values:  # no element shows epsilon at step 1: a decade either way
        values = [f32(float(opt.epsilon) * 10), f32(float(opt.epsilon) / 10)]
    return [Candidate(f"Adam epsilon {v:.3g} where the spec says {float(opt.epsilon):.3g}",
                      spec=unchecked(ctx.spec, optimizer=unchecked(opt, epsilon=v))) for v in values]


def _adam_convention(ctx):
    if not _adam(ctx):
        return []
    opt = ctx.spec.optimizer
    other = "eps_v_hat" if opt.convention == "eps_hat" else "eps_hat"
    what = {"eps_v_hat": "epsilon added to sqrt(v_hat) (torch / optax) where the spec adds it to sqrt(v) (Keras' "
                         "eps_hat)",
            "eps_hat": "epsilon added to sqrt(v) (Keras / TF1's eps_hat) where the spec adds it to sqrt(v_hat)"}[other]
    return [Candidate(f"Adam {what}", spec=unchecked(ctx.spec, optimizer=unchecked(opt, convention=other)))]


def _adam_bias(ctx):
    if not _adam(ctx):
        return []
    return [Candidate("Adam's bias correction one step ahead (1 - beta^(t+1) where the spec says 1 - beta^t)",
                      {"adam": {"offset": 1}}),
            Candidate("Adam's bias correction one step behind (1 - beta^(t-1))", {"adam": {"offset": -1}}),
            Candidate("Adam without bias correction", {"adam": {"no_bias": True}})]


def _adam_betas(ctx):
    if not _adam(ctx):
        return []
    opt = ctx.spec.optimizer
    return [Candidate(f"Adam's betas swapped (beta1 {float(opt.beta2):.4g}, beta2 {float(opt.beta1):.4g})",
                      spec=unchecked(ctx.spec, optimizer=unchecked(opt, beta1=opt.beta2, beta2=opt.beta1)))]


def _weight_decay(ctx):
    pairs = ctx.pair("weights", 1)
    if not pairs:
        return []
    a = [x for x, _ in pairs]
    b = [y for _, y in pairs]
    lam = 1 - _ratio(a, b)  # w1 = (1 - lam) * (the spec's w1)
    if not (lam > 0 and math.isfinite(lam)):
        return []
    return [Candidate(f"a decoupled weight decay {v:.3g} left on (w -= {v:.3g} * w after each update)",
                      {"weight_decay": v}, note=f"the weights after the first update are {1 - lam:.9g} times the "
                                                f"spec's") for v in _nice(lam)]


def _state_reset(ctx):
    opt = ctx.spec.optimizer
    if not (isinstance(opt, Adam) or getattr(opt, "momentum", 0) or hasattr(opt, "initial_accumulator")):
        return []
    return [Candidate(f"the optimizer ({type(opt).__name__}) re-created before every update: its state (moments, "
                      f"step count) starts afresh each step", {"reset": True})]


def _stale_state(ctx):
    """Adam's moments stop moving after update k: either the new value is computed and used but never stored (a
    functional update whose new state is dropped), or the stale value is used as it is."""
    if not _adam(ctx):
        return []
    names = {"v": "second moment", "m": "first moment", "mv": "moments"}
    out = []
    for k in (1, 2, 3):
        for which in ("v", "mv"):
            out.append(Candidate(f"Adam's {names[which]} not written back after update {k} (each update computes "
                                 f"from the stale state)", {"adam": {"after": k, "which": which, "kind": "not_stored"}}))
        out.append(Candidate(f"Adam's second moment frozen after update {k}",
                             {"adam": {"after": k, "which": "v", "kind": "not_updated"}}))
    return out


HALF_LIVES = (2, 5, 10, 20, 50, 100, 200, 500, 2000)


def _lr_schedule(ctx):
    """A decaying rate, searched on a grid of half-lives.  The first update (t = 0) is the spec's, exactly or rounded
    to float32 where the schedule computes in float32: where the first update differs, only that."""
    rounded_only = False
    if ctx.failing_w1:
        up = _updates(ctx)
        r = _ratio(*up) if up is not None else float("nan")
        if not abs(r - 1) < 1e-6:
            return []
        rounded_only = True
    out = []
    for h in HALF_LIVES:
        g = 0.5 ** (1 / h)
        for as_f32 in (True,) if rounded_only else (False,):  # float32-rounded rates: the refinement tries them
            out.append(Candidate(f"a learning-rate decay left on: lr * {g:.6g}^t (halves every {h} updates"
                                 + (", each rate rounded to float32)" if as_f32 else ")"),
                                 {"decay": g, "decay_f32": as_f32}))
    return out


def _batch_order(ctx):
    return [Candidate(f"batch order shifted: each step trains on the batch {k} step{'s' if k > 1 else ''} behind the "
                      f"spec's order (the first {'steps' if k > 1 else 'step'} on the first batch)", {"shift": k})
            for k in (1, 2)]


def _bn_momentum(ctx):
    if not any(isinstance(layer, BatchNorm) for layer in ctx.spec.layers):
        return []
    layers = tuple(unchecked(layer, momentum=1 - float(layer.momentum)) if isinstance(layer, BatchNorm) else layer
                   for layer in ctx.spec.layers)
    m = next(float(layer.momentum) for layer in ctx.spec.layers if isinstance(layer, BatchNorm))
    return [Candidate(f"BatchNorm momentum {1 - m:.3g} where the spec says {m:.3g}: the other convention (torch's "
                      f"weight of the new batch vs Keras' weight of the old average)",
                      spec=unchecked(ctx.spec, layers=layers))]


def _predict_training(ctx):
    if not (ctx.spec.couples_batch or ctx.spec.random_layers):
        return []
    return [Candidate("predictions in training mode (BatchNorm on the batch's statistics, dropout on: torch without "
                      "model.eval(), Keras' model(x, training=True))", {"predict_training": True})]


def _dropout_scaling(ctx):
    if not ctx.spec.random_layers:
        return []
    return [Candidate("dropout without the 1 / (1 - rate) scaling of the kept values at training time",
                      {"unscaled_dropout": True})]


def _softmax_axis(ctx):
    if ctx.spec.loss.prediction != "softmax" or not ctx.spec.loss.integer_labels:
        return []
    return [Candidate("softmax over the batch axis instead of the classes (axis 0 where the spec means the last; its "
                      "true gradient)", {"softmax_axis": "consistent"}),
            Candidate("softmax over the batch axis instead of the classes (axis 0; gradient p - onehot)",
                      {"softmax_axis": "formula"})]


_NONLINEAR = ("sigmoid", "relu", "tanh", "softmax", "leaky_relu", "gelu")


def _activation(ctx):
    spec = ctx.spec
    out = []
    last = len(spec.layers) - 1
    for i, layer in enumerate(spec.layers):
        act = getattr(layer, "activation", None)
        if act in _NONLINEAR:
            layers = spec.layers[:i] + (unchecked(layer, activation="linear"),) + spec.layers[i + 1:]
            out.append(Candidate(f"the {act} of layer {i} ({type(layer).__name__}) missing",
                                 spec=unchecked(spec, layers=layers)))
    layer = spec.layers[last]
    if isinstance(layer, (Dense, Conv2D)) and layer.activation == "linear":
        extra = {"softmax": "softmax", "sigmoid": "sigmoid"}.get(spec.loss.prediction)
        for act in filter(None, (extra, "relu")):
            layers = spec.layers[:last] + (unchecked(layer, activation=act),)
            what = (f"a {act} on the output layer where the loss expects logits (applied twice)" if act == extra
                    else "a relu on the output layer (logits clipped at zero)")
            out.append(Candidate(what, spec=unchecked(spec, layers=layers)))
    return out


FORWARD0, LOSS0, GRADS0, W1, STATE1 = "forward0", "loss0", "grads0", "w1", "state1"
_OPTIMIZER_ONLY = frozenset({FORWARD0, LOSS0, GRADS0})
_LATER = frozenset({FORWARD0, LOSS0, GRADS0, W1})

HYPOTHESES: tuple[Hypothesis, ...] = (
    Hypothesis("reduction", "reduction over the batch: sum where the spec says mean, or mean where it says sum",
               frozenset({FORWARD0}), _reduction),
    Hypothesis("loss_factor", "the loss or its gradient off by a constant factor (2, 1/2)", frozenset({FORWARD0}),
               _loss_factor),
    Hypothesis("gradient_sign", "a flipped gradient sign", frozenset({FORWARD0, LOSS0}), _gradient_sign),
    Hypothesis("kernel_layout", "a kernel transposed or permuted (dense (out, in), conv OIHW)", frozenset(),
               _kernel_layout),
    Hypothesis("flatten_order", "Flatten in (c, h, w) order", frozenset(), _flatten_order),
    Hypothesis("frozen_tensor", "a tensor never updated", _OPTIMIZER_ONLY, _frozen),
    Hypothesis("learning_rate", "a wrong learning rate (every update a constant ratio of the spec's)", _OPTIMIZER_ONLY,
               _learning_rate),
    Hypothesis("adam_epsilon", "Adam's epsilon value", _OPTIMIZER_ONLY, _adam_epsilon),
    Hypothesis("adam_convention", "Adam's epsilon convention (sqrt(v) + eps vs sqrt(v_hat) + eps)", _OPTIMIZER_ONLY,
               _adam_convention),
    Hypothesis("adam_bias_correction", "Adam's bias correction off by one step, or missing", _OPTIMIZER_ONLY,
               _adam_bias),
    Hypothesis("adam_betas", "Adam's betas swapped", _OPTIMIZER_ONLY, _adam_betas),
    Hypothesis("weight_decay", "a weight decay the spec does not have", _OPTIMIZER_ONLY, _weight_decay),
    Hypothesis("optimizer_state_reset", "optimizer state reset every step", _LATER, _state_reset),
    Hypothesis("stale_optimizer_state", "stale optimizer state", _LATER, _stale_state),
    Hypothesis("lr_schedule", "a learning-rate schedule the spec does not have", _OPTIMIZER_ONLY, _lr_schedule),
    Hypothesis("batch_order", "a shifted batch order", _LATER, _batch_order),
    Hypothesis("bn_momentum", "BatchNorm momentum in the other convention", frozenset({FORWARD0, LOSS0, GRADS0, W1}),
               _bn_momentum),
    Hypothesis("predict_training_mode", "predictions in training mode", frozenset({LOSS0, GRADS0, W1, STATE1}),
               _predict_training),
    Hypothesis("dropout_scaling", "dropout not inverted", frozenset({FORWARD0}), _dropout_scaling),
    Hypothesis("softmax_axis", "softmax over the wrong axis", frozenset(), _softmax_axis),
    Hypothesis("activation", "a missing or extra activation", frozenset(), _activation),
)
FLOAT32_INSIDE = Hypothesis("float32_inside", "float32 computation inside a float64 run", frozenset(), lambda c: [])
BY_ID = {h.id: h for h in (*HYPOTHESES, FLOAT32_INSIDE)}


# -------------------------------------------------------------------------------------------------------- measuring
def _group(quantity: str, step: int) -> str | None:
    return {("pred", 0): FORWARD0, ("invariance/pred", 0): FORWARD0, ("loss", 0): LOSS0, ("grads", 0): GRADS0,
            ("invariance/grads", 0): GRADS0, ("weights", 1): W1, ("state", 1): STATE1}.get((quantity, step))


def _units(a, b, dtype, floor) -> float:
    """agreement.units, where both sides are non-finite in the same places (a diverged row against a diverged
    hypothesis) only the finite elements count."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape == b.shape:
        fa, fb = np.isfinite(a), np.isfinite(b)
        if not (fa.all() and fb.all()) and np.array_equal(fa, fb):
            a, b = a[fa], b[fb]
    return agreement.units(a, b, dtype, floor)


def first_update_allowance(spec: ModelSpec, knobs: dict, ref: agreement.Reference, init, target: dict
                           ) -> dict | None:
    """Per parameter, how far each element of the weights after the first update may sit from ``target``'s because
    the step-0 gradient may sit anywhere within its bound: the changed oracle's first update of the gradient's interval
    ends (the same allowance as ``agreement.first_update_checks`` gives the verdict, here for a changed oracle: Adam's
    first step turns a near-zero gradient's rounding into a whole learning rate)."""
    names = spec.param_names()
    grads = [target.get(("grads", 0, n)) for n in names]
    if any(g is None for g in grads):
        return None
    eps = float(np.finfo(ref.dtype).eps)
    delta = [ref.bound(("grads", 0, n))[0] * eps * np.maximum(np.abs(g), ref.floors.get(("grads", 0, n), 0.0))
             for n, g in zip(names, grads)]
    from backends.base import BuildOptions

    edge = knobs.get("edge", {})

    def first_update(gs):
        m = HypModel(spec, [np.asarray(w, np.float64) for w in init], BuildOptions(dtype="float64"), knobs)
        with np.errstate(all="ignore"):
            m._apply([edge[j][0](g) if j in edge else g for j, g in enumerate(gs)])
        return m.get_weights()

    mid = first_update(grads)
    lo = first_update([g - d for g, d in zip(grads, delta)])
    hi = first_update([g + d for g, d in zip(grads, delta)])
    return {("weights", 1, n): np.maximum(np.abs(lo[j] - mid[j]), np.abs(hi[j] - mid[j])) for j, n in enumerate(names)}


def _local_gradients(spec: ModelSpec, knobs: dict, row_obs: dict, data: dict, seed: int, batch_size: int,
                     keys) -> dict:
    """The changed oracle's gradients at the row's own weights, at every step s >= 1 where the row recorded both (a
    float32 trajectory that took another ReLU switch computes its gradient elsewhere: there it is judged)."""
    from backends.base import BuildOptions

    names = spec.param_names()
    out: dict = {}
    order = data.get(f"seed{seed}/order_{batch_size}")
    for s in sorted({k[1] for k in keys if k[0] == "grads" and k[1] >= 1}):
        w = [row_obs.get(("weights", s, n)) for n in names]
        if order is None or s >= len(order) or any(a is None or not np.all(np.isfinite(a)) for a in w):
            continue
        idx = order[s]
        x = np.asarray(data["x"][idx], np.float64)
        y = data["y"][idx].astype(np.int64) if spec.loss.integer_labels else np.asarray(data["y"][idx], np.float64)
        m = HypModel(spec, [np.asarray(a, np.float64) for a in w], BuildOptions(dtype="float64", seed=seed), knobs)
        m.t = s  # the dropout masks of step s
        with np.errstate(all="ignore"):
            grads = m.gradients(x, y)[1]
        out.update({("grads", s, n): g for n, g in zip(names, grads)})
    return out


def measure(ref: agreement.Reference, row_obs: dict, target: dict, dtype: str | None = None,
            keys=None, allowance: dict | None = None, alt: dict | None = None,
            beyond: list | None = None) -> tuple[float, float, float, int]:
    """(worst, mean) error of the row against ``target`` in units of ``ref``'s bounds over their common checks, the
    largest scaled error, and the number of checks; ``beyond`` (a list) collects the keys beyond their bound."""
    dtype = dtype or ref.dtype
    ratios, scaled = [], 0.0
    for k in keys if keys is not None else target:
        if k not in row_obs or k not in target or k not in ref.floors:
            continue
        bound = ref.bound(k)[0]
        u = _units(row_obs[k], target[k], dtype, ref.floors[k])
        if alt and k in alt and u > bound:  # the same quantity computed another admissible way
            u = min(u, _units(row_obs[k], alt[k], dtype, ref.floors[k]))
        if allowance and k in allowance and u > bound:  # only the excess over the first update's allowance counts
            diff = np.asarray(row_obs[k], np.float64) - target[k]
            excess = np.sign(diff) * np.maximum(np.abs(diff) - allowance[k], 0.0)
            u = min(u, _units(target[k] + excess, target[k], dtype, ref.floors[k]))
        ratios.append(u / bound if bound > 0 else (0.0 if u == 0 else float("inf")))
        if beyond is not None and ratios[-1] > 1:
            beyond.append(k)
        scaled = max(scaled, agreement.scaled_error(row_obs[k], target[k])[0])
    if not ratios:
        return float("inf"), float("inf"), float("inf"), 0
    r = np.asarray(ratios)
    return float(r.max()), float(np.mean(np.minimum(r, 1e12))), scaled, len(ratios)


def _rerun(spec: ModelSpec, knobs: dict, init, data: dict, seed: int, batch_size: int, steps: int,
           dtype: str = "float64", rounding: str = "", check_every: int = 10) -> dict:
    from .worker import run_one

    # a changed spec alone runs in the oracle itself; knobs in HypModel (float64, plain rounding only)
    mod = SimpleNamespace(Model=lambda s, w, o: HypModel(s, w, o, knobs)) if knobs else oracle
    run = {"seed": seed, "batch_size": batch_size, "device": "cpu", "steps": steps, "check_every": check_every,
           "repeat": False, "timing": None, "invariance": False, "extra": {"rounding": rounding} if rounding else {}}
    with np.errstate(all="ignore"):  # a hypothesis may diverge (a learning rate 10x): its NaN are evidence too
        arrays, _ = run_one(mod, spec, [np.asarray(w, np.float64) for w in init], data, run,
                            {"dtype": dtype, "mode": "aligned"})
    return arrays


def _float32_reference(spec, init, data, seed, batch_size, steps, oracle_arrays) -> agreement.Reference:
    from .runner import variants_for

    variants = {v: _rerun(spec, {}, init, data, seed, batch_size, steps, "float32", "" if v == "plain" else v)
                for v in variants_for(spec, "float32", batch_size)}
    return agreement.build_reference(spec, "float32", oracle_arrays, variants)


def diagnose(spec: ModelSpec, row: dict, ref: agreement.Reference, data: dict, init: list[np.ndarray],
             failing: list[dict] | None = None, max_reruns: int = MAX_RERUNS) -> dict:
    """The named hypotheses that explain a failing (or diverged) row, best first, with their evidence.

    ``row``: the row's fields with its ``arrays``; ``ref``: the reference it was judged against (the oracle's
    observations and bounds in its dtype); ``data``: the job's data (``x``, ``y``, ``probe_x``, the batch orders);
    ``init``: its initial weights; ``failing``: the judged row's failing checks (which early observations fail)."""
    started = time.perf_counter()
    arrays = row.get("arrays") or {}
    dtype, batch_size, seed = ref.dtype, row["batch_size"], row.get("seed") or 0
    row_obs = agreement.observations(spec, arrays)
    baseline = {k: measure(ref, row_obs, ref.obs, keys=[k])[0] for k in row_obs if k in ref.obs}
    bad_steps = [k[1] for k, r in baseline.items() if r > 1]
    steps_done = len(np.asarray(arrays.get("losses", [])))
    first = min(bad_steps) if bad_steps else 0
    horizon = max(1, min(steps_done, max(first + 1, MIN_HORIZON)))
    keys = [k for k in row_obs if k[1] <= horizon and k in ref.obs]
    base_worst, base_mean, _, n_checks = measure(ref, row_obs, ref.obs, keys=keys)
    failing_groups = {_group(c["quantity"], c["step"]) for c in (failing or []) if c.get("ok") is False}
    failing_groups |= {_group(k[0], k[1]) for k in keys if baseline.get(k, 0) > 1}
    failing_groups.discard(None)
    ctx = Context(spec, dtype, batch_size, arrays, ref, [np.asarray(w, np.float64) for w in init], W1 in failing_groups)
    tried, skipped = [], []
    queue: list[tuple[Hypothesis, Candidate]] = []
    for hyp in HYPOTHESES:
        if hyp.keeps & failing_groups:
            continue  # it leaves alone an observation that fails: it cannot explain the row
        try:
            cands = hyp.candidates(ctx)
        except Exception as e:  # a hypothesis that cannot be set up for this model: said, never a crash
            skipped.append(f"{hyp.id}: {type(e).__name__}: {e}")
            continue
        if cands:
            tried.append(hyp.id)
            queue += [(hyp, c) for c in cands]
    if len(queue) > max_reruns:
        skipped += [f"{h.id}: {c.label} (over the limit of {max_reruns} reruns)" for h, c in queue[max_reruns:]]
        queue = queue[:max_reruns]
    reruns = 0

    def evaluate(items, h):
        nonlocal reruns
        out = []
        ks = [k for k in keys if k[1] <= h]
        for hyp, cand in items:
            reruns += 1
            try:
                target = agreement.observations(spec, _rerun(cand.spec or spec, cand.knobs, init, data, seed,
                                                             batch_size, h))
            except Exception as e:  # noqa: BLE001 - a candidate that cannot run is said, never a crash
                skipped.append(f"{hyp.id}: {cand.label}: {type(e).__name__}: {e}")
                continue
            beyond: list = []
            worst, mean, scaled, n = measure(ref, row_obs, target, keys=ks, beyond=beyond)
            if beyond and all(k in ((("weights", 1, k[2]),)) or (k[0] == "grads" and k[1] >= 1) for k in beyond):
                # judged as the verdict judges: Adam's first step near a zero gradient, and a gradient after step 0
                # where it was computed, at the row's own weights (agreement.local_gradient_checks); only where those
                # are the only checks beyond their bound (elsewhere the candidate cannot explain the row anyway)
                allowance = first_update_allowance(cand.spec or spec, cand.knobs, ref, init, target)
                local = _local_gradients(cand.spec or spec, cand.knobs, row_obs, data, seed, batch_size, ks)
                worst, mean, scaled, n = measure(ref, row_obs, target, keys=ks, allowance=allowance, alt=local)
            loss_mean = measure(ref, row_obs, target, keys=[k for k in ks if k[0] == "loss"])[1]
            out.append(({"cause": hyp.id, "title": hyp.title, "change": cand.label, "note": cand.note,
                         "worst": worst, "mean": mean, "loss_mean": loss_mean, "scaled": scaled, "checks": n,
                         "bounds": dtype, "horizon": h},
                        (hyp, cand)))
        return out

    # stage 1 over the steps up to the first failure (at least 0 and 1); what explains the row over all the steps
    # explains it there too, so only the candidates that do are run again over the whole horizon (stage 2)
    short = max(1, min(horizon, first + 1, steps_done))
    short = min(horizon, max(short, 2 if steps_done >= 2 else 1))
    scored = evaluate(queue, short)
    if short < horizon:
        survivors = [item for r, item in scored if r["worst"] <= 1]
        first_stage = scored
        scored = evaluate(survivors, horizon) if survivors else []
        if not any(r["worst"] <= 1 for r, _ in scored):
            # nothing explains it: the closest few of stage 1 (and a refined schedule) over the whole horizon, so that
            # the closest ones are compared on the same checks
            # the schedule's rate is searched where the schedule candidates were measured in full (they explained
            # the first stage), or else on the first stage, where they already differ
            refined = _refine_schedule(scored, evaluate, horizon, force=True)
            scored += refined
            if not refined:
                first_stage = first_stage + _refine_schedule(first_stage, evaluate, short, force=True)
            if not any(r["worst"] <= 1 for r, _ in scored):
                again = [item for r, item in sorted(first_stage, key=lambda x: _rank(x[0]["worst"], x[0]["mean"]))
                         if item not in survivors][:CLOSEST]
                scored += evaluate(again, horizon)
    else:
        scored += _refine_schedule(scored, evaluate, horizon)
    best: dict[str, dict] = {}
    for r, _ in scored:
        if r["cause"] not in best or _rank(r["worst"], r["mean"]) < _rank(best[r["cause"]]["worst"],
                                                                          best[r["cause"]]["mean"]):
            best[r["cause"]] = r
    results = list(best.values())
    explained = [r for r in results if r["worst"] <= 1]
    if dtype == "float64" and not explained and steps_done:
        # the float32 rounding envelope around the oracle: does every check lie within what float32 arithmetic moves?
        # (reported only where it does: its units are float32's, not comparable with a float64 'closest')
        reruns += 1 + 5
        tried.append(FLOAT32_INSIDE.id)
        o64 = _rerun(spec, {}, init, data, seed, batch_size, horizon)
        ref32 = _float32_reference(spec, init, data, seed, batch_size, horizon, o64)
        worst, mean, scaled, n = measure(ref32, row_obs, ref32.obs, dtype="float32", keys=keys)
        if worst <= 1:
            results.append({"cause": FLOAT32_INSIDE.id, "title": FLOAT32_INSIDE.title,
                            "change": "the numbers carry float32 rounding: every check lies within the float32 "
                                      "rounding envelope of the oracle", "note": "", "worst": worst, "mean": mean,
                            "scaled": scaled, "checks": n, "bounds": "float32", "horizon": horizon})
    own = sorted((r for r in results if r["worst"] <= 1 and r["bounds"] == dtype), key=lambda r: r["mean"])
    f32_ok = [r for r in results if r["worst"] <= 1 and r["bounds"] != dtype]
    rest = sorted((r for r in results if r["worst"] > 1 and r["worst"] * IMPROVEMENT <= base_worst),
                  key=lambda r: r["worst"])
    probable = own + f32_ok + rest
    for r in probable:
        r["explains"] = r["worst"] <= 1
        r["evidence"] = _evidence(r, base_worst, r["horizon"])
    return {"probable": probable[:SHOWN + 2], "tried": tried, "skipped": skipped, "reruns": reruns,
            "horizon": horizon, "checks": n_checks, "spec_worst": base_worst, "spec_mean": base_mean,
            "seconds": round(time.perf_counter() - started, 3)}


def _refine_schedule(scored: list, evaluate, horizon: int, rounds: int = 8, force: bool = False) -> list:
    """A decay rate between the grid's half-lives: golden-section search on log(half-life) around the best grid point
    of the lr_schedule hypothesis, where it does not explain the row yet (``force``: even where a candidate explains
    these steps: the first stage's short horizon, whose explanations did not hold over the whole one)."""
    sched = [(r, item) for r, item in scored if r["cause"] == "lr_schedule" and r["horizon"] == horizon]
    if not sched or (not force and any(r["worst"] <= 1 for r, _ in scored)):
        return []
    # the objective is the loss's typical error: a smooth function of the rate (a gradient after a ReLU switch is not)
    r0, (hyp, cand0) = min(sched, key=lambda x: x[0]["loss_mean"])
    as_f32 = cand0.knobs.get("decay_f32", False)
    h0 = math.log(0.5) / math.log(cand0.knobs["decay"])
    i = min(range(len(HALF_LIVES)), key=lambda k: abs(HALF_LIVES[k] - h0))
    lo = math.log(HALF_LIVES[max(i - 1, 0)])
    hi = math.log(HALF_LIVES[min(i + 1, len(HALF_LIVES) - 1)])
    out = []

    def at(logh):
        g = 0.5 ** (1 / math.exp(logh))
        cand = Candidate(cand0.label.split(": lr *")[0] + f": lr * {g:.6g}^t (halves every {math.exp(logh):.3g} "
                         f"updates" + (", each rate rounded to float32)" if as_f32 else ")"),
                         {"decay": g, "decay_f32": as_f32})
        res = evaluate([(hyp, cand)], horizon)
        out.extend(res)
        if res and res[0][0]["worst"] <= 1 and not force:
            return -1.0
        return res[0][0]["loss_mean"] if res else float("inf")

    phi = (math.sqrt(5) - 1) / 2
    a, b = lo, hi
    c, d = b - phi * (b - a), a + phi * (b - a)
    fc, fd = at(c), at(d)
    for _ in range(rounds - 2):
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - phi * (b - a)
            fc = at(c)
        else:
            a, c, fc = c, d, fd
            d = a + phi * (b - a)
            fd = at(d)
        if min(fc, fd) < 0 and not force:  # explains the row
            return out
    # a typed schedule is exact: the (rate, decay_steps) of ExponentialDecay nearest the estimate, tried as written
    h_est = math.exp(c if fc <= fd else d)
    typed = sorted(((abs(math.log(math.log(0.5) / (math.log(rate) / steps)) - math.log(h_est)), rate, steps)
                    for rate in DECAY_RATES for steps in DECAY_STEPS), key=lambda x: x[0])
    for dist, rate, steps in typed[:2]:
        if dist > 0.05:
            break
        for f32_rates in (True, False):
            cand = Candidate(f"a learning-rate decay left on: lr * {rate:g}^(t / {steps}) (Keras' ExponentialDecay("
                             f"decay_steps={steps}, decay_rate={rate:g})"
                             + (", each rate rounded to float32)" if f32_rates else ")"),
                             {"decay": rate ** (1 / steps), "decay_form": (rate, steps), "decay_f32": f32_rates})
            out.extend(evaluate([(hyp, cand)], horizon))
    return out


DECAY_RATES = (0.1, 0.5, 0.8, 0.9, 0.95, 0.96, 0.98, 0.99, 0.995, 0.999)
DECAY_STEPS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 10000)


def _rank(worst: float, mean: float) -> tuple:
    """Sort key: candidates that explain the row (worst <= 1) by their typical error, then the others by their worst."""
    return (0, mean) if worst <= 1 else (1, worst)


def _evidence(r: dict, base_worst: float, horizon: int) -> str:
    span = f"the first {horizon} step{'s' if horizon > 1 else ''}"
    if r["explains"]:
        how = (f"the oracle with this change matches the row within the {r['bounds']} bounds over {span} "
               f"({r['checks']} checks, worst {r['worst']:.2g}x its bound; the spec itself: {base_worst:.3g}x)")
        if r["bounds"] == "float64":
            how += f"; largest scaled error {r['scaled']:.1e}"
    else:
        how = (f"the oracle with this change comes closest but does not match: worst {r['worst']:.3g}x the bound over "
               f"{span} (the spec itself: {base_worst:.3g}x)")
    return how + (f"; {r['note']}" if r["note"] else "")


def top_cause(diagnosis: dict | None) -> str | None:
    probable = (diagnosis or {}).get("probable") or []
    return probable[0]["cause"] if probable else None


def format_diagnosis(diagnosis: dict | None, shown: int = SHOWN) -> list[str]:
    """Console lines for a row's ``diagnosis``; [] when there is none."""
    if not diagnosis:
        return []
    if diagnosis.get("error"):
        return [f"  diagnosis failed: {diagnosis['error']}"]
    probable = diagnosis.get("probable") or []
    if not probable:
        return [f"  no named cause explains it ({len(diagnosis.get('tried', []))} hypotheses tried: "
                f"{', '.join(diagnosis.get('tried', [])) or 'none applies'})"]
    lines = []
    for i, d in enumerate(probable[:shown]):
        head = "probable cause" if i == 0 and d["explains"] else ("also consistent" if d["explains"] else "closest")
        lines.append(f"  {head}: {d['change']} [{d['cause']}]")
        lines.append(f"    {d['evidence']}")
    return lines


def summary(diagnosis: dict | None) -> str:
    """One line for the tables: the first cause and whether it explains the row."""
    probable = (diagnosis or {}).get("probable") or []
    if not probable:
        return "" if diagnosis is None else "no named cause"
    d = probable[0]
    return f"{d['cause']}: {d['change']}" + ("" if d["explains"] else f" (closest, {d['worst']:.3g}x)")


