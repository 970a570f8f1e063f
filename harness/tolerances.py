"""The one tolerance table, keyed by dtype, check and float32 regime; each entry justified by a measurement.

The metric is the scaled error per tensor, ``max|a-b| / max(max|a|, max|b|)`` (a relative error for scalars); for
weights the scale is never below one learning rate (``harness.agreement.weight_scale_floor``, with its measurement).
Numbers are from ``shared/guides/numerics.md`` section 6 (tensorflow-cpu 2.21, keras 3.15.1, torch 2.13, jax 0.10.2,
2-core CPU): "noise" is the largest error seen between correct implementations, "bug" the smallest planted bug seen.
No entry is ever widened to turn a red row green: find the cause instead.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Tolerance:
    tol: float | None  # None: not compared (no gap between noise and bugs); the report says so
    why: str


# (dtype, check, regime) -> Tolerance; regime is "stable" or "chaotic" (spec.float32_chaotic), "*" for both
TABLE: dict[tuple[str, str, str], Tolerance] = {
    ("float64", "init", "*"): Tolerance(1e-12, "noise <= 9.7e-14 (init preds/grads); smallest bug 9.3e-6"),
    ("float64", "step1", "*"): Tolerance(1e-12, "loss/weights after 1 step: noise <= 9.7e-14, bug >= 9.3e-6"),
    ("float64", "step10", "*"): Tolerance(1e-10, "after 10 steps: noise <= 2.9e-12, bug >= 4.7e-4"),
    ("float64", "full", "*"): Tolerance(1e-9, "full run: noise <= 1.2e-11, bug >= 7.5e-4"),
    ("float64", "invariance", "*"): Tolerance(1e-12, "sum of B per-sample grads vs batch grad: summation order only"),
    ("float32", "init", "*"): Tolerance(1e-5, "init preds/grads: noise <= 1.5e-6, layout bugs >= 0.65"),
    ("float32", "invariance", "*"): Tolerance(1e-5, "per-sample vs batch in float32: summation order, like init"),
    ("float32", "loss10", "*"): Tolerance(1e-5, "loss over the first 10 steps: noise <= 5.2e-7"),
    ("float32", "grads_later", "*"): Tolerance(None, "float32 gradients after step 0 track chaotic weights: not compared"),
    ("float32", "weights1", "stable"): Tolerance(1e-6, "4-3-1 / Pima after 1 step: noise 7.7e-8, bug 2.9e-6"),
    ("float32", "weights1", "chaotic"): Tolerance(1e-4, "MNIST MLP / CNN after 1 step: noise 6.3e-6, bug 6.8e-3"),
    ("float32", "weights10", "stable"): Tolerance(1e-5, "4-3-1 / Pima stay <= 8.9e-7 over full runs"),
    ("float32", "weights10", "chaotic"): Tolerance(1e-3, "MNIST after 10 steps: noise 9.6e-5, bug 5.5e-2"),
    ("float32", "full_loss", "stable"): Tolerance(1e-5, "4-3-1 / Pima full-run loss: noise <= 8.9e-7"),
    ("float32", "full_loss", "chaotic"): Tolerance(2e-3, "MNIST full-run loss: noise 6.6e-4"),
    ("float32", "full_weights", "stable"): Tolerance(1e-5, "4-3-1 / Pima full-run weights: noise <= 8.9e-7, bug 5.3e-5"),
    ("float32", "full_weights", "chaotic"): Tolerance(None, "MNIST weights after many float32 steps: no gap, not compared"),
    ("float32", "full_pred", "stable"): Tolerance(1e-4, "4-3-1 / Pima full-run predictions"),
    ("float32", "full_pred", "chaotic"): Tolerance(None, "follows the chaotic weights: not compared"),
}


def lookup(dtype: str, check: str, chaotic: bool) -> Tolerance:
    regime = "chaotic" if chaotic else "stable"
    for key in ((dtype, check, regime), (dtype, check, "*")):
        if key in TABLE:
            return TABLE[key]
    raise KeyError(f"no tolerance for dtype={dtype} check={check} regime={regime}")


def check_for(quantity: str, step: int, dtype: str) -> str:
    """Which row of the table governs ``quantity`` ('loss', 'grads', 'weights', 'pred') observed at ``step``.

    ``step`` counts updates already applied (0 = initial weights).
    """
    if dtype == "float64":
        if step == 0:
            return "init"
        return "step1" if step <= 1 else "step10" if step <= 10 else "full"
    if step == 0:
        return "init"
    if quantity == "loss":
        return "loss10" if step < 10 else "full_loss"
    if quantity == "grads":
        return "grads_later"
    if quantity == "weights":
        return "weights1" if step <= 1 else "weights10" if step <= 10 else "full_weights"
    return "full_pred"
