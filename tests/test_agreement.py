import numpy as np
import pytest

from harness import agreement, tolerances
from models import MODELS


def fake_run(spec, rng, steps=12):
    names = spec.param_names()
    arrays = {"losses": rng.uniform(0.5, 1.0, steps), "pred_init": rng.uniform(size=(5, 1)),
              "pred_final": rng.uniform(size=(5, 1))}
    for s in (1, 10, steps):
        for j, shape in enumerate(spec.param_shapes()):
            arrays[f"weights/{s}/{j}"] = rng.normal(size=shape)
    for s in (0, 1, 10):
        for j, shape in enumerate(spec.param_shapes()):
            arrays[f"grads/{s}/{j}"] = rng.normal(size=shape)
    assert len(names) == len(spec.param_shapes())
    return arrays


def test_scaled_error():
    assert agreement.scaled_error([1.0, 2.0], [1.0, 2.0]) == (0.0, 0.0)
    err, mabs = agreement.scaled_error([1.0, -4.0], [1.0, -4.0 + 4e-6])
    assert err == pytest.approx(1e-6) and mabs == pytest.approx(4e-6)
    assert agreement.scaled_error([np.nan], [1.0])[0] == float("inf")
    assert agreement.scaled_error(np.ones(3), np.ones(4))[0] == float("inf")


def test_identical_runs_pass_and_a_tiny_planted_error_is_located():
    spec = MODELS["pima_mlp"]
    ref = fake_run(spec, np.random.default_rng(0))
    row = {k: v.copy() for k, v in ref.items()}
    assert agreement.summarize(agreement.compare_runs(spec, "float64", row, ref))["status"] == "pass"
    row["weights/10/3"] = row["weights/10/3"] * (1 + 1e-8)  # far below float32 noise, far above float64 noise
    summary = agreement.summarize(agreement.compare_runs(spec, "float64", row, ref))
    assert summary["status"] == "fail"
    first = summary["first_failure"]
    assert (first["quantity"], first["step"], first["tensor"]) == ("weights", 10, "dense1/bias")
    assert "step 10" in agreement.describe_failure(first)


def test_float32_chaotic_models_do_not_compare_late_weights():
    spec = MODELS["mnist_mlp"]
    ref = fake_run(spec, np.random.default_rng(0), steps=30)
    row = {k: v.copy() for k, v in ref.items()}
    row["weights/30/0"] = row["weights/30/0"] + 0.1
    checks = agreement.compare_runs(spec, "float32", row, ref)
    late = [c for c in checks if c.quantity == "weights" and c.step == 30]
    assert late and all(c.ok is None for c in late)
    assert agreement.summarize(checks)["status"] == "pass"
    # but the same error after one step is caught
    row["weights/1/0"] = row["weights/1/0"] * (1 + 1e-3)
    assert agreement.summarize(agreement.compare_runs(spec, "float32", row, ref))["status"] == "fail"


def test_divergence_is_named():
    spec = MODELS["mlp_431"]
    row = fake_run(spec, np.random.default_rng(0))
    row["losses"][4] = np.inf
    assert agreement.first_nonfinite(spec, row).startswith("diverged at step 4")
    row = fake_run(spec, np.random.default_rng(0))
    row["weights/10/2"][0, 0] = np.nan
    assert agreement.first_nonfinite(spec, row) == "diverged by step 10 (tensor dense1/kernel)"


def test_every_tolerance_is_justified_and_below_the_smallest_bug():
    for key, t in tolerances.TABLE.items():
        assert t.why, key
        if key[0] == "float64":
            assert t.tol is not None and t.tol <= 1e-9
    assert tolerances.check_for("loss", 0, "float64") == "init"
    assert tolerances.check_for("weights", 10, "float64") == "step10"
    assert tolerances.check_for("weights", 11, "float64") == "full"
    assert tolerances.lookup("float32", "weights1", True).tol == 1e-4


def test_a_bias_passing_through_zero_is_scaled_by_one_learning_rate():
    spec = MODELS["pima_mlp"]  # Adam lr 1e-3
    ref = fake_run(spec, np.random.default_rng(0))
    row = {k: v.copy() for k, v in ref.items()}
    ref["weights/10/5"] = np.array([-1.7091836e-05])
    row["weights/10/5"] = np.array([-1.7091166e-05])  # 6.7e-10 apart: one float32 ulp of a 1e-3 update
    checks = agreement.compare_runs(spec, "float32", row, ref)
    (bias,) = [c for c in checks if (c.quantity, c.step, c.tensor) == ("weights", 10, "dense2/bias")]
    assert bias.ok and bias.error == pytest.approx(6.7e-10 / 1e-3, rel=1e-2)
    row["weights/10/5"] = np.array([-1.7091836e-05 + 2e-7])  # 2e-4 of a step: a real difference
    checks = agreement.compare_runs(spec, "float32", row, ref)
    (bias,) = [c for c in checks if (c.quantity, c.step, c.tensor) == ("weights", 10, "dense2/bias")]
    assert bias.ok is False
