"""`harness check my_net.py` and `compare --backend-file`: a user's own implementation, loaded from its path.

The template (examples/my_backprop.py, the minimal contract) passes; a full-contract file passes; a planted mistake
fails; every error in the user's file is reported with the user's own file:line and a hint, never a harness traceback,
with the documented exit code (0 pass, 1 fail or error row, 2 bad input found before any work)."""

import json
import re
import subprocess

import pytest

from harness.cli import main
from harness.runner import PROJECT_ROOT
from harness.status import Status

TEMPLATE = PROJECT_ROOT / "examples" / "my_backprop.py"


def check(path, results_dir, *extra):
    return main(["check", str(path), "--model", "mlp_431", "--results-dir", str(results_dir), *extra])


def variant(tmp_path, old, new, name="my_backprop.py", count=1):
    """A copy of the template with ``old`` replaced by ``new`` (which must be there ``count`` times)."""
    text = TEMPLATE.read_text()
    assert text.count(old) == count, f"the template no longer has {old!r}"
    path = tmp_path / name
    path.write_text(text.replace(old, new))
    return path


def copy_as(tmp_path, name):
    path = tmp_path / name
    path.write_text(TEMPLATE.read_text())
    return path


def line_of(path, text):
    """The 1-based line of ``path`` that starts with ``text``."""
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if line.startswith(text))


def only_record(results_dir):
    (path,) = (results_dir / "raw").glob("*.json")
    return json.loads(path.read_text())


def assert_no_harness_traceback(text):
    assert "Traceback" not in text and "harness/worker.py" not in text and "harness/usercode.py" not in text, text


@pytest.fixture
def no_backend_work(monkeypatch):
    """Bad input is refused before any subprocess (the user's file or the oracle) starts."""
    def refuse(*a, **k):
        raise AssertionError(f"a subprocess was started for bad input: {a[:1]}")

    monkeypatch.setattr(subprocess, "Popen", refuse)


def test_the_template_passes_and_is_recorded_like_a_compare_run(results_dir, capsys):
    assert check(TEMPLATE, results_dir) == 0
    out = capsys.readouterr().out
    assert "verdict: pass" in out and "losses, gradients, weights, predictions" in out
    assert "not checked" not in out
    rec = only_record(results_dir)
    assert rec["kind"] == "compare" and rec["model"] == "mlp_431"
    rows = {r["batch_size"]: r for r in rec["rows"]}
    assert set(rows) == {1, 3} and all(r["backend"] == "my_backprop" and r["status"] == Status.PASS
                                       for r in rows.values())
    assert rows[3]["meta"]["determinism"]["bit_identical"]  # init() resets everything: the replay is identical
    assert rows[3]["version"].startswith("my_backprop.py sha256:")
    assert str(PROJECT_ROOT) not in json.dumps(rec["rows"])  # no machine paths in the rows


def test_the_template_passes_in_float32(results_dir, capsys):
    assert check(TEMPLATE, results_dir, "--dtype", "float32") == 0
    assert all(r["dtype"] == "float32" and r["status"] == Status.PASS for r in only_record(results_dir)["rows"])


def test_a_full_contract_file_passes(tmp_path, results_dir, capsys):
    path = tmp_path / "my_full.py"
    path.write_text("from backends.numpy_scratch import CAPABILITIES, Model, devices, probe  # noqa: F401\n")
    assert check(path, results_dir) == 0
    assert "verdict: pass" in capsys.readouterr().out
    assert all(r["backend"] == "my_full" for r in only_record(results_dir)["rows"])


def test_a_planted_mistake_fails_where_it_shows(tmp_path, results_dir, capsys):
    path = variant(tmp_path, "lr = spec.optimizer.lr ", "lr = 2 * spec.optimizer.lr ")
    assert check(path, results_dir) == 1
    out = capsys.readouterr().out
    assert "verdict: fail" in out
    assert f"{path}: fail at batch 1: first exceeds at step 1: weights" in out  # the gradients agree, the update not
    assert all(r["status"] == Status.FAIL for r in only_record(results_dir)["rows"])


def test_missing_optional_functions_mean_fewer_checks_and_say_so(tmp_path, results_dir, capsys):
    text = TEMPLATE.read_text()
    body = text[: text.index("def predict")] + text[text.index("def get_weights"):]
    path = tmp_path / "my_fewer.py"
    path.write_text(body.replace("def gradients(", "def _gradients(").replace("= gradients(x, y)", "= _gradients(x, y)"))
    assert check(path, results_dir) == 0
    out = capsys.readouterr().out
    assert "not checked: gradients (and their batch-size invariance) (my_fewer.py has no gradients())" in out
    assert "not checked: predictions (and their batch-size invariance) (my_fewer.py has no predict())" in out
    for r in only_record(results_dir)["rows"]:
        assert r["status"] == Status.PASS
        assert set(r["agreement"]["worst"]) == {"loss", "weights"}  # compared what is there, nothing else


@pytest.mark.parametrize("old, new, expected", [
    ("    return [W1, b1, W2, b2]", "    return [W1.T, b1, W2, b2]",
     ["get_weights()[0] (dense0/kernel) has shape (3, 4), expected (4, 3)", "hint: that is the transpose",
      "{path}:{def get_weights} in get_weights", "def get_weights():"]),
    ("    return [W1, b1, W2, b2]", "    return [W1, b1, W2]",
     ["get_weights() returned 3 arrays, expected 4", "dense1/bias (1,)", "def get_weights():"]),
    ("    W1, b1, W2, b2 = W1 - lr * dW1,", "    W1, b1, W2, b2 = W1 - lr * dW1.T,",
     ["{path}:{    W1, b1, W2, b2 = W1 - lr} in train_step", "W1, b1, W2, b2 = W1 - lr * dW1.T,",
      "ValueError: operands could not be broadcast",
      "hint: a shape mismatch: the harness calls train_step(x, y): x (1, 4), y (1, 1)"]),
    ("    return loss\n", "    return [loss, loss]\n",
     ["train_step() returned 2 values of shape (2,) as the loss, expected one number", "{path}:{def train_step} in "
      "train_step", "hint: reduce the per-sample losses"]),
], ids=["transposed kernel", "too few arrays", "exception in train_step", "loss not reduced"])
def test_errors_in_the_users_code_are_rows_with_the_users_lines(old, new, expected, tmp_path, results_dir, capsys):
    path = variant(tmp_path, old, new)
    assert check(path, results_dir) == 1
    out = capsys.readouterr().out
    assert_no_harness_traceback(out)
    assert "verdict: error" in out
    for text in expected:
        text = re.sub(r"\{([^}]+)\}", lambda m: str(path) if m[1] == "path" else str(line_of(path, m[1])), text)
        assert text in out, out
    assert all(r["status"] == Status.ERROR for r in only_record(results_dir)["rows"])


def test_an_error_as_the_file_loads_points_at_its_line(tmp_path, results_dir, capsys):
    path = variant(tmp_path, "import numpy as np\n", "import numpy as np\nimport not_a_package_anywhere\n")
    assert check(path, results_dir) == 1
    out = capsys.readouterr().out
    assert_no_harness_traceback(out)
    assert f"{path}:{line_of(path, 'import not_a')} in <module>" in out and "import not_a_package_anywhere" in out
    assert "ModuleNotFoundError: No module named 'not_a_package_anywhere'" in out and "hint: " in out


@pytest.mark.parametrize("case, expected", [
    ("syntax", ["syntax error in {path}:{def train_step}: expected ':'", "    def train_step(x, y)", "^", "hint: "]),
    ("no get_weights", ["{path} has no get_weights()", "def get_weights(): ...", "examples/my_backprop.py"]),
    ("arity", ["{path}:{def train_step}: def train_step(x) cannot be called as train_step(x, y)",
               "hint: def train_step(x, y)"]),
    ("masks without dropout", ["{path}:{def train_step}: train_step(x, y, masks) needs 3 arguments, but model "
                               "'mlp_431' has no Dropout"]),
    ("missing", ["file not found: {path}", "harness check examples/my_backprop.py"]),
    ("not python", ["{path} is not a .py file"]),
    ("built-in name", ["the file's name 'numpy' is a built-in backend's name", "rename the file, e.g. to my_numpy.py"]),
])
def test_bad_input_exits_2_before_any_work(case, expected, tmp_path, results_dir, no_backend_work, capsys):
    path = {
        "syntax": lambda: variant(tmp_path, "def train_step(x, y):", "def train_step(x, y)"),
        "no get_weights": lambda: variant(tmp_path, "def get_weights():\n    return [W1, b1, W2, b2]\n", ""),
        "arity": lambda: variant(tmp_path, "def train_step(x, y):", "def train_step(x):"),
        "masks without dropout": lambda: variant(tmp_path, "def train_step(x, y):", "def train_step(x, y, masks):"),
        "missing": lambda: tmp_path / "nowhere.py",
        "not python": lambda: copy_as(tmp_path, "my_backprop.txt"),
        "built-in name": lambda: copy_as(tmp_path, "numpy.py"),
    }[case]()
    assert check(path, results_dir) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("harness: error: ")
    assert_no_harness_traceback(captured.err + captured.out)
    for text in expected:
        if path.exists():
            text = re.sub(r"\{(def [^}]+)\}", lambda m: str(line_of(path, m[1])), text)
        assert text.replace("{path}", str(path)) in captured.err, captured.err
    assert not (results_dir / "raw").exists()


def test_dropout_masks_reach_the_minimal_contract(tmp_path, results_dir, capsys):
    """A BatchNorm + Dropout model through the minimal contract: train_step(x, y, masks) gets the harness's masks (the
    wrapped NumPy backend's own seed would draw others), get_state() gives the moving statistics; without a masks
    parameter the file is refused before any work."""
    path = tmp_path / "my_bn.py"
    path.write_text('''
import numpy as np
from backends.base import BuildOptions
from backends.numpy_scratch import Model

model = None


def init(spec, weights):
    global model
    model = Model(spec, weights, BuildOptions(dtype=str(weights[0].dtype), seed=12345))


def _masks(masks):
    model.dropout_masks = lambda step, batch_size, dtype=None: [np.asarray(m, model.dtype) for m in masks]


def train_step(x, y, masks):
    _masks(masks)
    return model.train_step(x, y)


def get_weights():
    return model.get_weights()


def get_state():
    return model.get_state()
''')
    example = PROJECT_ROOT / "examples" / "my_model.py"
    assert main(["check", str(path), "--model", str(example), "--steps", "12", "--results-dir", str(results_dir)]) == 0
    out = capsys.readouterr().out
    assert "BatchNorm statistics" in out.split("verdict: pass")[1]
    assert "not checked: gradients" in out and "not checked: predictions" in out
    path.write_text(path.read_text().replace("def train_step(x, y, masks):", "def train_step(x, y):"))
    assert main(["check", str(path), "--model", str(example), "--results-dir", str(results_dir)]) == 2
    assert "train_step(x, y) takes no dropout masks" in capsys.readouterr().err


def test_compare_takes_backend_files(tmp_path, results_dir, capsys):
    wrong = variant(tmp_path, "lr = spec.optimizer.lr ", "lr = 2 * spec.optimizer.lr ", name="my_wrong.py")
    assert main(["compare", "--model", "mlp_431", "--backends", "numpy", "--backend-file", str(TEMPLATE),
                 "--backend-file", str(wrong), "--no-timing", "--results-dir", str(results_dir)]) == 1
    by = {}
    for r in only_record(results_dir)["rows"]:
        by.setdefault(r["backend"], set()).add(r["status"])
    assert by == {"numpy": {Status.PASS}, "my_backprop": {Status.PASS}, "my_wrong": {Status.FAIL}}
    same = copy_as(tmp_path, "my_backprop.py")
    assert main(["compare", "--model", "mlp_431", "--backend-file", str(TEMPLATE), "--backend-file", str(same),
                 "--results-dir", str(results_dir)]) == 2
    assert "have the same name 'my_backprop'" in capsys.readouterr().err
