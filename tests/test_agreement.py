"""The agreement engine on synthetic runs: the envelope, the floor tied to the whole set, locating a failure."""

import numpy as np
import pytest

from harness import agreement, tolerances
from harness.status import Status
from models import MODELS


def fake_run(spec, rng, steps=12):
    arrays = {"losses": rng.uniform(0.5, 1.0, steps), "pred_init": rng.uniform(size=(5, 1)),
              "pred_final": rng.uniform(size=(5, 1))}
    for s in (1, 10, steps):
        for j, shape in enumerate(spec.param_shapes()):
            arrays[f"weights/{s}/{j}"] = rng.normal(size=shape)
    for s in (0, 1, 10):
        for j, shape in enumerate(spec.param_shapes()):
            arrays[f"grads/{s}/{j}"] = rng.normal(size=shape)
    return arrays


def perturbed(arrays, rng, rel):
    """A copy whose every value moved by about ``rel`` of its own size: a stand-in for a rounding variant."""
    return {k: v * (1 + rel * rng.standard_normal(np.shape(v))) for k, v in arrays.items()}


def reference(spec, dtype, oracle, rel, n=3, seed=1):
    rng = np.random.default_rng(seed)
    return agreement.build_reference(spec, dtype, oracle, {f"v{i}": perturbed(oracle, rng, rel) for i in range(n)})


def status(spec, ref, row):
    return agreement.summarize(agreement.compare_runs(spec, ref, row))


def test_scaled_error():
    assert agreement.scaled_error([1.0, 2.0], [1.0, 2.0]) == (0.0, 0.0)
    err, mabs = agreement.scaled_error([1.0, -4.0], [1.0, -4.0 + 4e-6])
    assert err == pytest.approx(1e-6) and mabs == pytest.approx(4e-6)
    assert agreement.scaled_error([np.nan], [1.0])[0] == float("inf")
    assert agreement.scaled_error(np.ones(3), np.ones(4))[0] == float("inf")


def test_identical_runs_pass_and_an_error_outside_the_envelope_is_located():
    spec = MODELS["pima_mlp"]
    oracle = fake_run(spec, np.random.default_rng(0))
    ref = reference(spec, "float32", oracle, rel=1e-7)
    row = {k: v.copy() for k, v in oracle.items()}
    assert status(spec, ref, row)["status"] == Status.PASS
    row["weights/10/3"] = row["weights/10/3"] * (1 + 1e-3)  # 10,000x the variants' spread
    summary = status(spec, ref, row)
    assert summary["status"] == Status.FAIL
    first = summary["first_failure"]
    assert (first["quantity"], first["step"], first["tensor"]) == ("weights", 10, "dense1/bias")
    text = agreement.describe_failure(first)
    assert "step 10" in text and "rounding units" in text and "envelope" in text and "x its bound" in text


def test_the_bound_follows_the_envelope_a_chaotic_run_stays_comparable():
    """The same 1e-3 error fails where the variants agree to 1e-7 and passes where they spread by 1e-4 (a chaotic
    float32 trajectory): the bound is measured, not tabled."""
    spec = MODELS["mnist_mlp"]
    oracle = fake_run(spec, np.random.default_rng(0), steps=30)
    row = {k: v.copy() for k, v in oracle.items()}
    row["weights/30/0"] = row["weights/30/0"] * (1 + 1e-3)
    assert status(spec, reference(spec, "float32", oracle, rel=1e-7), row)["status"] == Status.FAIL
    assert status(spec, reference(spec, "float32", oracle, rel=1e-4), row)["status"] == Status.PASS


def test_a_denormal_gradient_against_an_exact_zero_is_not_a_failure_in_float64():
    """mnist_mlp seed 3 batch 1 (issue 11): the oracle's gradient of a dead layer is ~1e-312, the backend's exactly 0.
    A per-tensor scale turned that into a scaled error of 1.0; the floor is tied to the whole gradient set."""
    spec = MODELS["mnist_mlp"]
    oracle = fake_run(spec, np.random.default_rng(0))
    oracle["grads/10/0"] = np.full(spec.param_shapes()[0], 1e-312)
    ref = agreement.build_reference(spec, "float64", oracle, {"v": {k: v.copy() for k, v in oracle.items()}})
    row = {k: v.copy() for k, v in oracle.items()}
    row["grads/10/0"] = np.zeros(spec.param_shapes()[0])
    checks = agreement.compare_runs(spec, ref, row)
    (dead,) = [c for c in checks if (c.quantity, c.step, c.tensor) == ("grads", 10, "dense0/kernel")]
    assert dead.error == 1.0 and dead.ok  # 100% of its own size, nothing at the scale of the gradients
    assert agreement.summarize(checks)["status"] == Status.PASS
    # but a whole tensor that is wrong at the scale of the set fails, even where every variant agrees exactly
    row["grads/10/0"] = np.full(spec.param_shapes()[0], 1e-6)
    assert agreement.summarize(agreement.compare_runs(spec, ref, row))["status"] == Status.FAIL


def test_a_pair_of_backends_gets_both_bounds():
    spec = MODELS["pima_mlp"]
    oracle = fake_run(spec, np.random.default_rng(0))
    ref = reference(spec, "float32", oracle, rel=1e-6)
    rng = np.random.default_rng(5)
    a, b = perturbed(oracle, rng, 1e-6), perturbed(oracle, rng, 1e-6)
    assert agreement.summarize(agreement.compare_runs(spec, ref, a, b))["status"] == Status.PASS
    b["losses"] = b["losses"] + 0.1
    assert agreement.summarize(agreement.compare_runs(spec, ref, a, b))["status"] == Status.FAIL


def test_invariance_is_bounded_by_the_variants_own_gaps():
    spec = MODELS["pima_mlp"]
    oracle = fake_run(spec, np.random.default_rng(0))
    shapes = spec.param_shapes()
    for j, shape in enumerate(shapes):
        oracle[f"inv_batch_grad/{j}"] = np.ones(shape)
        oracle[f"inv_grad/{j}"] = np.ones(shape) + 1e-7  # the oracle's own summation-order gap
    oracle["inv_pred_rows"] = oracle["pred_init"][:3].copy()
    ref = agreement.build_reference(spec, "float32", oracle, {})
    row = {k: v.copy() for k, v in oracle.items()}
    assert all(c.ok for c in agreement.invariance_checks(spec, ref, row))
    row["inv_grad/1"] = row["inv_grad/1"] * 10  # a reduction bug: per-sample sum vs batch mean
    bad = [c for c in agreement.invariance_checks(spec, ref, row) if c.ok is False]
    assert [(c.quantity, c.tensor) for c in bad] == [("invariance/grads", "dense0/bias")]


def test_divergence_is_named():
    spec = MODELS["mlp_431"]
    row = fake_run(spec, np.random.default_rng(0))
    row["losses"][4] = np.inf
    assert agreement.first_nonfinite(spec, row).startswith("diverged at step 4")
    row = fake_run(spec, np.random.default_rng(0))
    row["weights/10/2"][0, 0] = np.nan
    assert agreement.first_nonfinite(spec, row) == "diverged by step 10 (tensor dense1/kernel)"


def test_a_run_of_the_wrong_length_fails():
    spec = MODELS["mlp_431"]
    oracle = fake_run(spec, np.random.default_rng(0))
    ref = reference(spec, "float64", oracle, rel=1e-15)
    row = {k: v.copy() for k, v in oracle.items()}
    row["losses"] = row["losses"][:-1]
    summary = status(spec, ref, row)
    assert summary["status"] == Status.FAIL and "ran 11 steps, reference ran 12" in \
        agreement.describe_failure(summary["first_failure"])


def test_every_policy_is_justified():
    for dtype in ("float32", "float64"):
        p = tolerances.policy(dtype)
        assert 1 < p.multiple(0) == p.multiple(1) <= p.multiple(2) and p.floor_ulps > 0 and "calibration.md" in p.why
    with pytest.raises(KeyError, match="float16"):
        tolerances.policy("float16")


def test_a_whole_gradient_set_of_denormals_against_zeros_passes():
    """mnist_mlp seed 3 batch 1 at step 10: every gradient is ~1e-312 (a saturated softmax), tf1/jax/keras give 0."""
    spec = MODELS["mnist_mlp"]
    oracle = fake_run(spec, np.random.default_rng(0))
    for j, shape in enumerate(spec.param_shapes()):
        oracle[f"grads/10/{j}"] = np.full(shape, 9e-313)
    ref = agreement.build_reference(spec, "float64", oracle, {"v": {k: v.copy() for k, v in oracle.items()}})
    row = {k: v.copy() for k, v in oracle.items()}
    for j, shape in enumerate(spec.param_shapes()):
        row[f"grads/10/{j}"] = np.zeros(shape)
    assert status(spec, ref, row)["status"] == Status.PASS
    row["grads/10/0"] = np.full(spec.param_shapes()[0], 1e-300)  # normal numbers: a real difference again
    assert status(spec, ref, row)["status"] == Status.FAIL


def test_a_late_envelope_never_shrinks_an_early_one_keeps_its_own():
    """Past the first switch a scalar's distance wanders (MNIST CNN float32, seed 17, batch 100: the variants' loss
    distance 1.8 units at step 5, 0.06 for one of them); the envelope at a late step is the largest seen at that check
    at any late step so far, while steps 0 and 1 keep their own."""
    spec = MODELS["mlp_431"]
    oracle = fake_run(spec, np.random.default_rng(0))
    variant = {k: v.copy() for k, v in oracle.items()}
    eps = float(np.finfo(np.float32).eps)
    for s, u in {0: 2.0, 1: 50.0, 2: 1.0, 3: 40.0, 4: 3.0, 5: 0.5}.items():  # the variant's loss, off by u units
        variant["losses"][s] = oracle["losses"][s] * (1 + u * eps)
    env = agreement.build_reference(spec, "float32", oracle, {"v": variant}).envelope
    got = [env[("loss", s, "loss")] for s in range(6)]
    assert got == pytest.approx([2.0, 50.0, 1.0, 40.0, 40.0, 40.0], rel=1e-3)


def test_a_late_envelope_pools_the_tensors_of_a_quantity():
    """Which tensor a late switch hits is chance: at a late step every tensor of a quantity gets the largest distance
    any of them showed; at steps 0 and 1 each tensor keeps its own."""
    spec = MODELS["mlp_431"]
    oracle = fake_run(spec, np.random.default_rng(0))
    variant = {k: v.copy() for k, v in oracle.items()}
    for s in (1, 10):
        variant[f"grads/{s}/2"] = oracle[f"grads/{s}/2"] * (1 + 1e-4)  # one tensor moved, the others exact
    env = agreement.build_reference(spec, "float32", oracle, {"v": variant}).envelope
    names = spec.param_names()
    assert env[("grads", 1, names[2])] > 100 and env[("grads", 1, names[0])] == 0.0
    assert all(env[("grads", 10, n)] == env[("grads", 10, names[2])] > 100 for n in names)
    assert env[("weights", 10, names[0])] == 0.0  # another quantity: not pooled with the gradients


def test_the_switch_probe_bounds_only_late_gradients_and_weights():
    """The float32 switch probe (Monte Carlo arithmetic at 64 ulps) takes the ReLU / max-pool switches the one-ulp
    variants may all miss; it widens late gradients, weights and final predictions only, never steps 0-1, the loss or
    the batch-size invariance, where the planted bugs are caught."""
    spec = MODELS["mlp_431"]
    oracle = fake_run(spec, np.random.default_rng(0))
    for j, shape in enumerate(spec.param_shapes()):
        oracle[f"inv_batch_grad/{j}"] = np.ones(shape)
        oracle[f"inv_grad/{j}"] = np.ones(shape)
    oracle["inv_pred_rows"] = oracle["pred_init"][:3].copy()
    probe = perturbed(oracle, np.random.default_rng(2), 1e-3)
    plain = agreement.build_reference(spec, "float32", oracle, {"mca": oracle}).envelope
    env = agreement.build_reference(spec, "float32", oracle, {"mca": oracle, "switch": probe}).envelope
    assert agreement.is_switch_probe("switch") and not agreement.is_switch_probe("mca")
    widened = {k for k in env if env[k] > plain[k]}
    assert widened and all(k[0] in ("grads", "weights", "pred") and k[1] >= 2 for k in widened)
    assert any(k[0] == "grads" for k in widened) and any(k[0] == "weights" for k in widened)


def test_gradients_after_step_0_are_checked_at_the_runs_own_weights():
    """A float32 run whose weights have parted from the oracle's (a switch, Adam's sign on a near-zero gradient) still
    computes the right gradient *at its own weights*: that passes however far the trajectory went, and a wrong gradient
    function fails there (here 1e-3 off)."""
    from backends.base import BuildOptions
    from backends.numpy_scratch import Model

    spec = MODELS["pima_mlp"]
    rng = np.random.default_rng(0)
    w = [rng.normal(0, 0.3, s) for s in spec.param_shapes()]
    x, y = rng.normal(size=(10, 8)), rng.integers(0, 2, (10, 1)).astype(np.float64)
    parted = [a + rng.normal(0, 1e-2, a.shape) for a in w]  # far outside any trajectory envelope
    row = {f"weights/1/{j}": a for j, a in enumerate(parted)}
    _, g = Model(spec, parted, BuildOptions(dtype="float32")).gradients(x.astype(np.float32), y.astype(np.float32))
    row.update({f"grads/1/{j}": np.asarray(a, np.float64) for j, a in enumerate(g)})
    variants = ["plain", "blocked+mca", "mca"]
    checks = agreement.local_gradient_checks(spec, "float32", row, {1: (x, y)}, variants)
    assert len(checks) == len(spec.param_names()) and all(c.ok for c in checks)
    assert all(c.step == 1 and c.why == "at this run's own weights" for c in checks)
    row["grads/1/0"] = row["grads/1/0"] * (1 + 1e-3)
    bad = [c for c in agreement.local_gradient_checks(spec, "float32", row, {1: (x, y)}, variants) if not c.ok]
    assert [(c.quantity, c.tensor) for c in bad] == [("grads", "dense0/kernel")]


def test_step1_weights_of_a_flipped_near_zero_gradient_pass_as_a_first_update_and_a_wrong_update_fails():
    """Adam's first step turns a gradient element's sign into a whole learning rate: where the step-0 gradient bound
    straddles zero, a correct run may land ~2 lr away (mnist_bn_cnn float32 seed 38, torch); only that is forgiven."""
    import dataclasses

    import backends.numpy_scratch as numpy_oracle
    from backends.base import BuildOptions
    from harness.agreement import Reference, first_update_checks, units
    from models import init_weights

    spec = MODELS["pima_mlp"]
    init = init_weights(spec, 0)
    rng = np.random.default_rng(0)
    g64 = [rng.normal(0, 1, s) for s in spec.param_shapes()]
    g64[0][0, 0] = 5e-7  # near zero, but above Adam's epsilon (1e-7): its first update is most of a learning rate

    def first_update(grads, sp=spec):
        m = numpy_oracle.Model(sp, init, BuildOptions(dtype="float64"))
        m._apply(grads)
        return m.get_weights()

    w64 = first_update(g64)
    names = spec.param_names()
    obs = {("grads", 0, n): g for n, g in zip(names, g64)} | {("weights", 1, n): w for n, w in zip(names, w64)}
    floors = {k: 1e-3 * 3.0 if k[0] == "grads" else spec.optimizer.lr for k in obs}
    ref = Reference("float32", obs, {k: 200.0 for k in obs}, floors)  # gradient bound 16*200+8 units: delta 1.1e-6
    flipped = [g.copy() for g in g64]
    flipped[0][0, 0] = -5e-7  # 1e-6 from the oracle's: inside the step-0 gradient bound
    row = {f"weights/1/{j}": w for j, w in enumerate(first_update(flipped))}
    bound = ref.bound(("weights", 1, names[0]))[0]
    assert units(row["weights/1/0"], w64[0], "float32", floors[("weights", 1, names[0])]) > 50 * bound  # trajectory
    checks = first_update_checks(spec, ref, row, init)
    assert len(checks) == len(names) and all(c.ok for c in checks), [c.ratio for c in checks]
    faster = dataclasses.replace(spec, optimizer=dataclasses.replace(spec.optimizer, lr=spec.optimizer.lr * 2))
    bug = {f"weights/1/{j}": w for j, w in enumerate(first_update(g64, faster))}
    assert not all(c.ok for c in first_update_checks(spec, ref, bug, init))  # a wrong learning rate still fails
