"""The agreement engine: compares a backend's run with the oracle's (or any two runs), tensor by tensor, step by step.

Every comparison yields a :class:`Check` (quantity, step, tensor, scaled error, max abs error, tolerance); a row's
status is ``pass`` when every compared check is within its tolerance, ``fail`` otherwise, and the report names the
first step and tensor where a tolerance is exceeded.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

import numpy as np

from .tolerances import check_for, lookup


@dataclass
class Check:
    quantity: str  # loss | grads | weights | pred | invariance/grads | invariance/pred
    step: int  # updates applied before the observation (0 = initial weights)
    tensor: str  # parameter name, "loss", "probe"
    error: float  # scaled error max|a-b| / max(max|a|, max|b|)
    max_abs: float
    tol: float | None  # None: not compared (the table says why)
    why: str

    @property
    def ok(self) -> bool | None:
        if self.tol is None:
            return None
        return bool(self.error <= self.tol)

    def as_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}


def scaled_error(a, b, floor: float = 0.0) -> tuple[float, float]:
    """``max|a-b| / max(max|a|, max|b|, floor)`` and ``max|a-b|``; inf for a shape mismatch or a NaN/Inf.

    ``floor`` keeps a tensor that passes near zero from turning an ulp into a failure: weights are compared with a
    floor of one learning rate (see WEIGHT_SCALE_FLOOR)."""
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


def _indexed(arrays: dict, prefix: str) -> dict[int, list[np.ndarray]]:
    """{step: [tensor_0, tensor_1, ...]} from keys like 'grads/10/3'."""
    out: dict[int, dict[int, np.ndarray]] = {}
    pat = re.compile(rf"^{prefix}/(\d+)/(\d+)$")
    for k, v in arrays.items():
        m = pat.match(k)
        if m:
            out.setdefault(int(m.group(1)), {})[int(m.group(2))] = v
    return {s: [d[j] for j in sorted(d)] for s, d in out.items()}


# Weights are scaled by at least one learning rate, the size of one optimizer step.  Without a floor, a tensor that
# passes near zero (Pima's scalar output bias was -1.7e-5 after 4 Adam steps) turns a one-ulp difference of its
# 1e-3-sized update into a large relative error: two correct float32 runs differing only in the summation order of the
# batch measured 1.4e-5 there (> the 1e-5 tolerance), an absolute difference of 6.7e-10.  Gradients, losses and
# predictions have no floor.
def weight_scale_floor(spec) -> float:
    return float(spec.optimizer.lr)


def compare_runs(spec, dtype: str, row: dict, ref: dict) -> list[Check]:
    """Checks of ``row`` against ``ref`` (both: the arrays a worker run wrote)."""
    names = spec.param_names()
    chaotic = spec.float32_chaotic
    checks: list[Check] = []
    wfloor = weight_scale_floor(spec)

    def add(quantity, step, tensor, a, b, check):
        t = lookup(dtype, check, chaotic)
        err, mabs = scaled_error(a, b, wfloor if quantity == "weights" else 0.0)
        checks.append(Check(quantity, step, tensor, err, mabs, t.tol, t.why))

    la, lb = np.asarray(row.get("losses", [])), np.asarray(ref.get("losses", []))
    for s in range(min(len(la), len(lb))):
        add("loss", s, "loss", la[s], lb[s], check_for("loss", s, dtype))
    if len(la) != len(lb):
        checks.append(Check("loss", min(len(la), len(lb)), "steps", float("inf"), float("inf"), 0.0,
                            f"ran {len(la)} steps, reference ran {len(lb)}"))
    for quantity in ("grads", "weights"):
        ga, gb = _indexed(row, quantity), _indexed(ref, quantity)
        for s in sorted(set(ga) & set(gb)):
            for j, (a, b) in enumerate(zip(ga[s], gb[s])):
                add(quantity, s, names[j], a, b, check_for(quantity, s, dtype))
    if "pred_init" in row and "pred_init" in ref:
        add("pred", 0, "probe", row["pred_init"], ref["pred_init"], check_for("pred", 0, dtype))
    if "pred_final" in row and "pred_final" in ref:
        s = len(la)
        add("pred", s, "probe", row["pred_final"], ref["pred_final"], check_for("pred", s, dtype))
    checks.sort(key=lambda c: c.step)
    return checks


def invariance_checks(spec, dtype: str, row: dict) -> list[Check]:
    """Batch-size invariance within one run: per-sample gradients reduced per the spec vs the batch gradient, and
    batch-1 predictions vs the rows of the batch prediction, at the initial weights."""
    checks: list[Check] = []
    t = lookup(dtype, "invariance", spec.float32_chaotic)
    names = spec.param_names()
    batch = _indexed(row, "grads").get(0)
    for j, name in enumerate(names):
        key = f"inv_grad/{j}"
        if key in row and batch is not None:
            err, mabs = scaled_error(row[key], batch[j])
            checks.append(Check("invariance/grads", 0, name, err, mabs, t.tol, t.why))
    if "inv_pred_rows" in row and "pred_init" in row:
        err, mabs = scaled_error(row["inv_pred_rows"], row["pred_init"])
        checks.append(Check("invariance/pred", 0, "probe", err, mabs, t.tol, t.why))
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
    """Status, first failure and the worst error per quantity."""
    failed = [c for c in checks if c.ok is False]
    worst: dict[str, float] = {}
    for c in checks:
        if c.tol is not None:
            worst[c.quantity] = max(worst.get(c.quantity, 0.0), c.error)
    first = min(failed, key=lambda c: (c.step, c.quantity != "loss")) if failed else None
    return {
        "status": "fail" if failed else "pass",
        "n_checks": sum(c.tol is not None for c in checks),
        "n_failed": len(failed),
        "worst": worst,
        "first_failure": first.as_dict() if first else None,
        "not_compared": sorted({f"{c.quantity}@{c.step}: {c.why}" for c in checks if c.tol is None})[:3],
    }


def describe_failure(f: dict) -> str:
    return (f"first exceeds at step {f['step']}: {f['quantity']} {f['tensor']} "
            f"scaled error {f['error']:.2e} > tol {f['tol']:.0e}")
