"""A backend module and the NumPy float64 oracle stepped side by side in one process (the optimizer tests of
tests/test_backend_tf.py and tests/test_backend_torch_jax.py)."""

from __future__ import annotations

import dataclasses

import numpy as np

import backends.numpy_scratch as ref
from backends.base import BuildOptions
from harness.runner import batch_order, load_data
from models import get_model, init_weights
from models.spec import ModelSpec


def scaled_error(a, b, floor: float = 1e-300) -> float:
    """``max|a - b| / max(max|a|, max|b|, floor)``; inf where the shapes differ."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        return float("inf")
    scale = max(np.max(np.abs(a)), np.max(np.abs(b)), floor)
    return float(np.max(np.abs(a - b)) / scale)


def with_convention(model: str, convention: str | None) -> ModelSpec:
    """The built-in model with its Adam's epsilon convention replaced (``None``: the spec as it is)."""
    spec = get_model(model)
    if convention is None:
        return spec
    return spec.with_overrides(optimizer=dataclasses.replace(spec.optimizer, convention=convention))


def optimizer_vs_oracle(mod, spec: ModelSpec, dtype: str, steps: int = 12, fast: bool = False) -> dict:
    """``steps`` aligned steps of the backend module ``mod`` and of the NumPy float64 oracle from the same weights, on
    the model's real data in the harness's batch order at the spec's larger batch size.  Returns
    ``info["optimizer"]`` and the worst scaled error over the loss and every weight after every step (weights never
    scaled by less than one learning rate, as in the harness's tables: a bias passing through zero must not turn an ulp
    into a failure; TF1's Pima output bias does at step 4)."""
    w = init_weights(spec, 0)
    _, x, y, _, _ = load_data(spec, None)
    order = batch_order(len(x), spec.batch_sizes[-1], steps, 0, spec.shuffle)
    m = mod.Model(spec, w, BuildOptions(dtype=dtype, fast=fast))
    o = ref.Model(spec, w, BuildOptions(dtype="float64"))
    worst = 0.0
    for idx in order:
        worst = max(worst, scaled_error(m.train_step(x[idx], y[idx]), o.train_step(x[idx], y[idx])))
        for a, b in zip(m.get_weights(), o.get_weights(), strict=True):
            worst = max(worst, scaled_error(a, b, floor=spec.optimizer.lr))
    return {"optimizer": m.info["optimizer"], "worst": worst, "steps": len(order)}
