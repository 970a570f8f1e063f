"""The agreement engine: compares a backend's run with the NumPy float64 oracle, tensor by tensor, step by step.

A fixed tolerance table cannot hold: the noise of a correct float32 run depends on the seed, the step and the tensor
(a gradient that is a cancelling sum near zero, a ReLU that switches), and it grows along a chaotic trajectory.  So
the bound of every check is measured in the same run, by the **rounding envelope**:

* the oracle is run again *in the backend's dtype* in a few variants that differ from it only in rounding (the plain
  code, every matmul summed in two blocks, each batch summed in reverse order, Adam's update in torch's order of
  operations: ``backends.numpy_scratch.ROUNDING_VARIANTS``);
* for every check (quantity, step, tensor) the envelope is the largest ``max|variant - oracle64|`` over the variants:
  what a correct implementation in that dtype computes there;
* a backend passes a check when ``max|backend - oracle64| <= multiple * envelope + floor``, where the floor is a few
  ulps of the dtype times the scale of the *whole* set observed at that step (all gradients, all weights, the loss,
  the predictions), never of one tensor alone: a tensor that is a cancelling sum near zero (an output bias, a dead
  layer, a gradient of 1e-312 in float64) cannot turn rounding into a failure, and a tensor that is off by more than
  the set's rounding is still seen.

``multiple`` and the floor live in ``harness/tolerances.py`` with the measurements that justify them
(``results/calibration.md``, written by ``harness calibrate``).  Every check keeps its scaled error
``max|a-b| / max(max|a|, max|b|)`` for the tables; the verdict is the bound.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

import numpy as np

from .status import Status
from .tolerances import policy

Key = tuple[str, int, str]  # (quantity, step, tensor)


@dataclass
class Check:
    quantity: str  # loss | grads | weights | pred | invariance/grads | invariance/pred
    step: int  # updates applied before the observation (0 = initial weights)
    tensor: str  # parameter name, "loss", "probe"
    error: float  # scaled error max|a-b| / max(max|a|, max|b|) (for the tables)
    max_abs: float  # max|a-b|: what the verdict compares with the bound
    bound: float | None  # multiple * envelope + floor; None: not compared
    envelope: float | None  # the rounding envelope at this check (largest variant distance to the oracle)
    why: str = ""

    @property
    def ok(self) -> bool | None:
        if self.bound is None:
            return None
        return bool(self.max_abs <= self.bound)

    @property
    def ratio(self) -> float:
        """max|a-b| in units of the bound (> 1 fails)."""
        if self.bound is None:
            return 0.0
        if self.max_abs == 0.0:
            return 0.0
        return self.max_abs / self.bound if self.bound > 0 else float("inf")

    def as_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok, "ratio": self.ratio}


def scaled_error(a, b, floor: float = 0.0) -> tuple[float, float]:
    """``max|a-b| / max(max|a|, max|b|, floor)`` and ``max|a-b|``; inf for a shape mismatch or a NaN/Inf."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if a.shape != b.shape:
        return float("inf"), float("inf")
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        return float("inf"), float("inf")
    diff = float(np.max(np.abs(a - b))) if a.size else 0.0
    scale = max(float(np.max(np.abs(a))) if a.size else 0.0, float(np.max(np.abs(b))) if b.size else 0.0, floor)
    if diff == 0.0:
        return 0.0, 0.0
    return diff / scale, diff


def _max_abs(a) -> float:
    a = np.asarray(a, np.float64)
    return float(np.max(np.abs(a))) if a.size else 0.0


def _indexed(arrays: dict, prefix: str) -> dict[int, list[np.ndarray]]:
    """{step: [tensor_0, tensor_1, ...]} from keys like 'grads/10/3'."""
    out: dict[int, dict[int, np.ndarray]] = {}
    pat = re.compile(rf"^{prefix}/(\d+)/(\d+)$")
    for k, v in arrays.items():
        m = pat.match(k)
        if m:
            out.setdefault(int(m.group(1)), {})[int(m.group(2))] = v
    return {s: [d[j] for j in sorted(d)] for s, d in out.items()}


def observations(spec, arrays: dict) -> dict[Key, np.ndarray]:
    """Everything a run observed, keyed (quantity, step, tensor): per-step losses, gradients, weights, predictions."""
    names = spec.param_names()
    obs: dict[Key, np.ndarray] = {}
    losses = np.asarray(arrays.get("losses", []), np.float64)
    for s, v in enumerate(losses):
        obs[("loss", s, "loss")] = v
    for quantity in ("grads", "weights"):
        for s, tensors in _indexed(arrays, quantity).items():
            for j, t in enumerate(tensors):
                obs[(quantity, s, names[j])] = t
    if "pred_init" in arrays:
        obs[("pred", 0, "probe")] = arrays["pred_init"]
    if "pred_final" in arrays:
        obs[("pred", len(losses), "probe")] = arrays["pred_final"]
    return obs


def invariance_gaps(spec, arrays: dict) -> dict[Key, float]:
    """Batch-size invariance within one run, at the initial weights: ``max|sum of per-sample gradients (reduced per
    the spec) - batch gradient|`` per tensor, and ``max|batch-1 predictions - rows of the batch prediction|``."""
    names = spec.param_names()
    out: dict[Key, float] = {}
    batch = _indexed(arrays, "grads").get(0)
    for j, name in enumerate(names):
        key = f"inv_grad/{j}"
        if key in arrays and batch is not None:
            out[("invariance/grads", 0, name)] = scaled_error(arrays[key], batch[j])[1]
    if "inv_pred_rows" in arrays and "pred_init" in arrays:
        out[("invariance/pred", 0, "probe")] = scaled_error(arrays["inv_pred_rows"], arrays["pred_init"])[1]
    return out


@dataclass
class Reference:
    """The float64 oracle's observations of one (seed, batch size) and the rounding envelope of one dtype around it."""

    dtype: str
    obs: dict[Key, np.ndarray]
    envelope: dict[Key, float]  # largest max|variant - oracle| per check (invariance: largest gap of any variant)
    scale: dict[tuple[str, int], float]  # (quantity, step) -> max |oracle| over the whole set
    variants: list[str] = field(default_factory=list)

    def bound(self, key: Key, factor: float = 1.0) -> tuple[float, float]:
        """(bound, envelope) of one check; ``factor`` 2 for a pair of backends (each within its own bound)."""
        pol = policy(self.dtype)
        env = self.envelope.get(key, 0.0)
        q, s = key[0], key[1]
        scale_key = {"invariance/grads": ("grads", 0), "invariance/pred": ("pred", 0)}.get(q, (q, s))
        floor = pol.floor_ulps * float(np.finfo(self.dtype).eps) * self.scale.get(scale_key, 0.0)
        return factor * (pol.multiple * env + floor), env


def build_reference(spec, dtype: str, oracle: dict, variants: dict[str, dict]) -> Reference:
    """The envelope of ``variants`` (name -> arrays of the oracle run in ``dtype`` with that rounding variant) around
    the float64 ``oracle`` arrays.  A variant that diverged or lacks a check contributes nothing there."""
    obs = observations(spec, oracle)
    scale: dict[tuple[str, int], float] = {}
    for (q, s, _), v in obs.items():
        scale[(q, s)] = max(scale.get((q, s), 0.0), _max_abs(v))
    env: dict[Key, float] = {k: 0.0 for k in obs}
    inv = invariance_gaps(spec, oracle)
    for arrays in variants.values():
        vobs = observations(spec, arrays)
        for k, ref in obs.items():
            if k in vobs:
                d = scaled_error(vobs[k], ref)[1]
                if np.isfinite(d):
                    env[k] = max(env[k], d)
        for k, d in invariance_gaps(spec, arrays).items():
            if np.isfinite(d):
                inv[k] = max(inv.get(k, 0.0), d)
    env.update(inv)
    return Reference(dtype, obs, env, scale, sorted(variants))


def _check(ref: Reference, key: Key, a, b, factor: float, weight_floor: float) -> Check:
    err, _ = scaled_error(a, b, weight_floor if key[0] == "weights" else 0.0)
    mabs = scaled_error(a, b)[1]
    bound, env = ref.bound(key, factor)
    return Check(key[0], key[1], key[2], err, mabs, bound, env)


def compare_runs(spec, ref: Reference, row: dict, other: dict | None = None) -> list[Check]:
    """Checks of ``row`` (the arrays a worker run wrote) against the oracle of ``ref`` -- or, with ``other``, against
    another backend's run (a pair: each may sit anywhere in its own bound, so the bound counts twice)."""
    factor = 1.0 if other is None else 2.0
    target = ref.obs if other is None else observations(spec, other)
    mine = observations(spec, row)
    wfloor = float(spec.optimizer.lr)  # weights' scaled error (display only) never below one learning rate
    checks = [_check(ref, k, mine[k], target[k], factor, wfloor) for k in target if k in mine and k in ref.obs]
    n_row = len(np.asarray(row.get("losses", [])))
    n_ref = sum(1 for k in target if k[0] == "loss")
    if n_row != n_ref:
        checks.append(Check("loss", min(n_row, n_ref), "steps", float("inf"), float("inf"), 0.0, None,
                            f"ran {n_row} steps, reference ran {n_ref}"))
    checks.sort(key=lambda c: c.step)
    return checks


def invariance_checks(spec, ref: Reference, row: dict) -> list[Check]:
    """The row's own batch-size invariance gaps, bounded by the gaps of the oracle's variants in the same dtype."""
    checks = []
    for key, gap in invariance_gaps(spec, row).items():
        bound, env = ref.bound(key)
        scale = ref.scale.get(("grads", 0) if key[0] == "invariance/grads" else ("pred", 0), 0.0)
        checks.append(Check(key[0], 0, key[2], gap / scale if scale else (0.0 if gap == 0 else float("inf")), gap,
                            bound, env))
    return checks


def first_nonfinite(spec, row: dict) -> str | None:
    """'diverged at step k (tensor ...)' for the first NaN/Inf in the losses or weights, else None."""
    losses = np.asarray(row.get("losses", []))
    bad = np.flatnonzero(~np.isfinite(losses))
    if bad.size:
        return f"diverged at step {int(bad[0])} (tensor loss = {losses[bad[0]]})"
    names = spec.param_names()
    for s, tensors in sorted(_indexed(row, "weights").items()):
        for j, w in enumerate(tensors):
            if not np.all(np.isfinite(w)):
                return f"diverged by step {s} (tensor {names[j]})"
    return None


def summarize(checks: list[Check]) -> dict:
    """Status, first failure, the worst scaled error per quantity and the worst error in units of its bound."""
    failed = [c for c in checks if c.ok is False]
    worst: dict[str, float] = {}
    worst_ratio: dict[str, float] = {}
    for c in checks:
        if c.bound is not None:
            worst[c.quantity] = max(worst.get(c.quantity, 0.0), c.error)
            worst_ratio[c.quantity] = max(worst_ratio.get(c.quantity, 0.0), c.ratio)
    first = min(failed, key=lambda c: (c.step, -c.ratio)) if failed else None
    return {
        "status": Status.FAIL if failed else Status.PASS,
        "n_checks": sum(c.bound is not None for c in checks),
        "n_failed": len(failed),
        "worst": worst,
        "worst_ratio": worst_ratio,
        "first_failure": first.as_dict() if first else None,
    }


def describe_failure(f: dict) -> str:
    what = f["quantity"] if f["tensor"] == f["quantity"] or f["tensor"] == "loss" else f"{f['quantity']} {f['tensor']}"
    if f["bound"] == 0.0 or f["envelope"] is None:
        return f"first exceeds at step {f['step']}: {what}: {f['why'] or 'mismatch'}"
    return (f"first exceeds at step {f['step']}: {what} off by {f['max_abs']:.2e}, {f['ratio']:.3g}x its bound "
            f"{f['bound']:.1e} (rounding envelope {f['envelope']:.1e}; scaled error {f['error']:.1e})")
