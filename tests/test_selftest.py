from harness.cli import main
from harness.mutants import BUGS
from harness.selftest import format_selftest, run_selftest


def test_every_planted_bug_is_caught_and_clean_copies_pass():
    result = run_selftest(model="mnist_mlp", seeds=2, steps=12)
    assert {r["bug"] for r in result["bugs"]} == set(BUGS)
    missed = [(r["bug"], r["status"], r["reason"]) for r in result["bugs"] if not r["caught"]]
    assert not missed
    assert not result["false_alarms"] and len(result["clean"]) == 4
    # the bugs that change the forward pass or the gradient show at step 0; optimizer bugs once it has stepped
    at = {r["bug"]: r["step"] for r in result["bugs"]}
    assert at["transposed_weight"] == at["gradient_sign"] == at["reduction"] == at["float32_loss"] == 0
    assert at["adam_eps"] == at["adam_convention"] == at["bias_frozen"] == at["batch_shift"] == 1
    assert "planted bugs caught: 9/9" in format_selftest(result)


def test_selftest_cli_exit_code(capsys):
    assert main(["selftest", "--seeds", "1"]) == 0
    assert "false alarms: 0" in capsys.readouterr().out
    assert main(["selftest", "--steps", "3"]) == 2
    assert "at least 10 steps" in capsys.readouterr().err
