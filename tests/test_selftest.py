"""``harness selftest``: planted bugs are caught in both dtypes at both batch sizes; real backends raise no false alarm;
and the false-alarm count is a measurement that can fail."""

import importlib.util

import pytest

from harness.cli import main
from harness.mutants import BUGS, NEEDS
from harness.selftest import format_selftest, run_selftest, sweep
from harness.status import Status


def test_every_planted_bug_is_caught_within_10_steps_in_both_dtypes_at_both_batch_sizes():
    result = run_selftest(["mnist_mlp"], ["float32", "float64"], seeds=1, clean_backends=[], bug_seeds=1)
    rows = {(r["bug"], r["dtype"], r["batch_size"]): r for r in result["bugs"]}
    assert {b for b, _, _ in rows} == set(BUGS)
    missed = [(k, r["status"], r["reason"]) for k, r in rows.items() if r["caught"] is False]
    assert not missed
    # not applicable, honestly: float32 accumulation inside a float32 run; sum vs mean of one sample; no BN, dropout,
    # conv or image Flatten in an MLP
    na = sorted(k for k, r in rows.items() if r["caught"] is None)
    layer_bugs = sorted((b, dt, bs) for b in [*NEEDS, "conv_kernel_transposed", "flatten_chw"]
                        for dt in ("float32", "float64") for bs in (1, 100))
    assert na == sorted([("float32_loss", "float32", 1), ("float32_loss", "float32", 100), ("reduction", "float32", 1),
                         ("reduction", "float64", 1)] + layer_bugs)
    # the bugs that change the forward pass or the gradient show at step 0; optimizer bugs once it has stepped; a
    # re-created Adam's first update is the spec's, so state_reset shows from step 2
    at = {k: r["step"] for k, r in rows.items() if r["caught"] and r["status"] == Status.FAIL}
    for dt in ("float32", "float64"):
        for b in (1, 100):
            assert (at[("transposed_weight", dt, b)] == at[("gradient_sign", dt, b)] == at[("loss_halved", dt, b)]
                    == at[("softmax_axis", dt, b)] == at[("activation_missing", dt, b)] == 0)
            assert at[("weight_decay", dt, b)] == at[("bias_frozen", dt, b)] == at[("batch_shift", dt, b)] == 1
            assert at[("lr_typo", dt, b)] == at[("adam_bias_step", dt, b)] == 1
            assert 2 <= at[("state_reset", dt, b)] <= 10
    text = format_selftest(result)
    assert "catch rate within 10 steps: float32 33/33; float64 35/35" in text
    # issue 14: each is named by its own cause first (harness/diagnose.py against harness.mutants.CAUSE)
    misnamed = [(k, r["expected_cause"], (r.get("diagnosis") or {}).get("line")) for k, r in rows.items()
                if r["named"] is False]
    assert not misnamed
    assert "named correctly (the diagnosis's first cause is the bug's own): float32 33/33; float64 35/35" in text
    assert all(r["named"] is None for r in rows.values() if not r["caught"])


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch not installed: pip install '.[torch]'")
def test_the_false_alarm_count_comes_from_real_backends_and_can_fail():
    clean = sweep("pima_mlp", ["torch"], [0, 38], "float32")
    assert {r["status"] for r in clean} == {Status.PASS}
    assert all(r["optimizer"].startswith("built-in") or r["optimizer"].startswith("hand-written") for r in clean)
    result = {"clean": clean, "bugs": [], "false_alarms": [], "errors": [], "missed": [], "models": ["pima_mlp"],
              "dtypes": ["float32"], "catch_within": 10}
    assert "false alarms: 0 of 4 clean rows" in format_selftest(result)


def test_a_wrong_backend_among_the_clean_ones_is_counted_as_a_false_alarm(monkeypatch):
    """The count is not 0 by construction: a backend that is off (here the batch-shift mutant posing as a clean
    backend) shows up in it."""
    monkeypatch.setenv("DLCOMPARE_PLUGINS", "posing=harness.mutants:DLCOMPARE_MUTANT=batch_shift")
    result = run_selftest(["pima_mlp"], ["float64"], seeds=1, clean_backends=["posing"], bug_seeds=1)
    assert len(result["false_alarms"]) == 2 and not result["ok"]
    assert "FAIL pima_mlp float64 posing seed 0" in format_selftest(result)


def test_selftest_cli_exit_codes(capsys):
    assert main(["selftest", "--models", "mlp_431", "--seeds", "1", "--bug-seeds", "1", "--backends", "none"]) == 0
    out = capsys.readouterr().out
    assert "planted bugs caught" in out and "MISSED" not in out and "MISNAMED" not in out
    assert main(["selftest", "--steps", "5"]) == 2
    assert "at least 12 steps" in capsys.readouterr().err
    assert main(["selftest", "--models", "nope"]) == 2
    assert "unknown model 'nope'" in capsys.readouterr().err
    assert main(["selftest", "--dtypes", "float16"]) == 2
    assert "unknown dtype 'float16'" in capsys.readouterr().err


def test_batchnorm_and_dropout_bugs_are_caught_on_a_model_with_both():
    """Issue 12: the state comparison and the inference-mode predictions have teeth: a BatchNorm momentum in the other
    convention, predictions left in training mode and unscaled dropout each fail at once, in both dtypes."""
    from pathlib import Path

    example = str(Path(__file__).resolve().parent.parent / "examples" / "my_model.py")
    result = run_selftest([example], ["float32", "float64"], seeds=1, clean_backends=[], bug_seeds=1)
    rows = [r for r in result["bugs"] if r["bug"] in NEEDS]
    assert len(rows) == 3 * 2 * 2 and all(r["caught"] for r in rows), [(r["bug"], r["reason"]) for r in rows]
    first = {r["bug"]: r["step"] for r in rows}
    assert first == {"bn_momentum_convention": 1, "predict_training_mode": 0, "dropout_unscaled": 0}
    assert not result["missed"]
    assert all(r["named"] for r in rows), [(r["bug"], r["dtype"], r["batch_size"], r["diagnosis"]) for r in rows]


def test_a_bug_that_cannot_exist_in_a_model_is_not_applicable_not_missed():
    """perceptron_or has no bias: a frozen bias computes the spec's very numbers there, so it is n/a, not a miss."""
    result = run_selftest(["perceptron_or"], ["float64"], seeds=1, clean_backends=[], bug_seeds=1)
    rows = [r for r in result["bugs"] if r["bug"] == "bias_frozen"]
    assert rows and all(r["caught"] is None for r in rows) and not result["missed"]
