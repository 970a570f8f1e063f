"""The diagnosis (harness/diagnose.py): named hypotheses tested against the oracle, for failing rows only; it never
changes a verdict, and a diagnosis that cannot be made is said, never a crash."""

from __future__ import annotations

import numpy as np
import pytest

from harness import diagnose, runner
from harness.rows import Row
from harness.status import Status


@pytest.fixture(scope="module")
def pima(tmp_path_factory):
    """pima_mlp (Adam, sigmoid BCE) at batch 10, float64: the job, the judged oracle and its reference."""
    cfg = runner.CompareConfig(model="pima_mlp", backends=[], steps=12, dtype="float64", timing=False, repeat=False)
    spec = runner.validate(cfg)
    job = runner.prepare(cfg, spec)
    work = tmp_path_factory.mktemp("oracle")
    oracle = runner.run_oracle(job, "float64", 12, 10, {"dtype": "float64", "mode": "aligned", "threads": 1,
                                                        "fast": False}, 300, work)
    return spec, job, oracle


def _row(spec, job, arrays, batch_size=10) -> Row:
    return Row(backend="mine", dtype="float64", mode="aligned", batch_size=batch_size, device="cpu",
               status=Status.OK, seed=0, arrays=arrays)


def _arrays(spec, job, knobs=None, changed_spec=None, batch_size=10):
    return diagnose._rerun(changed_spec or spec, knobs or {}, job.weights, job.data, 0, batch_size, 12)


def test_neutral_knobs_reproduce_the_oracle(pima):
    """The changed oracle with changes that change nothing (factor 1, lr factor 1, Adam offset 0) is the oracle, to
    rounding: the machinery itself adds nothing a hypothesis could be mistaken for."""
    spec, job, _ = pima
    plain = _arrays(spec, job)
    neutral = _arrays(spec, job, {"scale": 1.0, "lr_factor": 1.0, "adam": {"offset": 0}})
    for k, v in plain.items():
        np.testing.assert_allclose(neutral[k], v, rtol=1e-12, atol=1e-15, err_msg=k)


def test_a_clean_row_passes_without_a_diagnosis(pima):
    spec, job, oracle = pima
    judged = runner.judge(spec, _row(spec, job, _arrays(spec, job)), oracle, job)
    assert judged["status"] == Status.PASS
    assert judged.get("diagnosis") is None


@pytest.mark.parametrize("knobs, changed, cause", [
    ({"lr_factor": 0.5}, None, "learning_rate"),
    ({"scale": 2.0}, None, "loss_factor"),
    ({"frozen": frozenset({1})}, None, "frozen_tensor"),
    ({"adam": {"offset": 1}}, None, "adam_bias_correction"),
    ({"shift": 1}, None, "batch_order"),
    (None, "betas", "adam_betas"),
])
def test_a_failing_row_is_named_and_stays_failing(pima, knobs, changed, cause):
    spec, job, oracle = pima
    changed_spec = None
    if changed == "betas":
        opt = spec.optimizer
        changed_spec = diagnose.unchecked(spec, optimizer=diagnose.unchecked(opt, beta1=opt.beta2, beta2=opt.beta1))
    judged = runner.judge(spec, _row(spec, job, _arrays(spec, job, knobs, changed_spec)), oracle, job)
    assert judged["status"] == Status.FAIL  # the diagnosis never turns a fail into a pass
    d = judged["diagnosis"]
    assert diagnose.top_cause(d) == cause, d
    assert d["probable"][0]["explains"] and d["probable"][0]["worst"] <= 1
    text = "\n".join(diagnose.format_diagnosis(d))
    assert "probable cause" in text and f"[{cause}]" in text and "matches the row" in text


def test_an_unexplained_row_says_so(pima):
    """Weights moved by noise after the first update: no named change explains that, and the diagnosis says so (or
    offers only a 'closest', never a 'probable cause')."""
    spec, job, oracle = pima
    arrays = _arrays(spec, job)
    rng = np.random.default_rng(0)
    for k in [k for k in arrays if k.startswith("weights/")]:
        arrays[k] = arrays[k] + 1e-3 * rng.standard_normal(arrays[k].shape)
    judged = runner.judge(spec, _row(spec, job, arrays), oracle, job)
    assert judged["status"] == Status.FAIL
    text = "\n".join(diagnose.format_diagnosis(judged["diagnosis"]))
    assert "probable cause" not in text and ("no named cause" in text or "closest" in text), text


def test_a_diagnosis_that_breaks_is_said_not_raised(pima, monkeypatch):
    spec, job, oracle = pima

    def broken(*a, **k):
        raise RuntimeError("planted")

    monkeypatch.setattr(diagnose, "diagnose", broken)
    judged = runner.judge(spec, _row(spec, job, _arrays(spec, job, {"scale": 2.0})), oracle, job)
    assert judged["status"] == Status.FAIL
    assert judged["diagnosis"]["error"] == "RuntimeError: planted"
    assert diagnose.format_diagnosis(judged["diagnosis"]) == ["  diagnosis failed: RuntimeError: planted"]


def test_every_planted_bug_has_a_hypothesis():
    from harness.mutants import BUGS, CAUSE

    assert set(CAUSE) == set(BUGS)
    assert set(CAUSE.values()) == set(diagnose.BY_ID), set(CAUSE.values()) ^ set(diagnose.BY_ID)  # one bug or more each


WALKTHROUGH = [  # the README's walk-through: (the template's line, the planted mistake, what the diagnosis says)
    ("    d_out = 2 * (out - y)", "    d_out = (out - y)",
     "probable cause: the gradient 0.5 times the spec's, the loss right"),
    ("    lr = spec.optimizer.lr", "    lr = 2 * spec.optimizer.lr",
     "probable cause: learning rate 0.2 where the spec says 0.1"),
    ("W1, b1, W2, b2 = W1 - lr * dW1, b1 - lr * db1, W2 - lr * dW2, b2 - lr * db2",
     "W1, b1, W2 = W1 - lr * dW1, b1 - lr * db1, W2 - lr * dW2", "probable cause: dense1/bias never updated"),
    ("    d_z2 = d_out * out * (1 - out)", "    d_z2 = d_out", "closest: "),
]


@pytest.mark.parametrize("line, mistake, said", WALKTHROUGH)
def test_the_readme_walkthrough(tmp_path, capsys, line, mistake, said):
    """Each mistake the README plants in examples/my_backprop.py fails and reads as the README says."""
    from pathlib import Path

    from harness.cli import main

    src = (Path(__file__).resolve().parent.parent / "examples" / "my_backprop.py").read_text()
    assert src.count(line) == 1
    (tmp_path / "my_backprop.py").write_text(src.replace(line, mistake))
    code = main(["check", str(tmp_path / "my_backprop.py"), "--model", "mlp_431",
                 "--results-dir", str(tmp_path / "results")])
    out = capsys.readouterr().out
    assert code == 1
    assert said in out, out
    if said.startswith("closest"):
        assert "probable cause" not in out
