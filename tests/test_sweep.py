"""``harness sweep``: the work count, the width variants, a real (small) sweep through the CLI, its failures and its
report (harness/sweep.py)."""

import json

import pytest

from harness import cli, sweep
from harness.report import build_reports
from models import get_model


def test_train_flops_counts_forward_and_both_gradients_but_the_first_input_gradient():
    mlp = get_model("mnist_mlp")  # 784 -> 256 -> 256 -> 10
    per_sample = 2 * (784 * 256 * 2 + 256 * 256 * 3 + 256 * 10 * 3)
    assert sweep.train_flops(mlp, 1) == per_sample
    assert sweep.train_flops(mlp, 100) == 100 * per_sample
    cnn = get_model("mnist_cnn")  # conv32 3x3 on 28x28x1 -> 26x26x32; pool; conv64 3x3 -> 11x11x64; ...
    conv1 = 2 * 26 * 26 * 32 * 9 * 1 * 2
    conv2 = 2 * 11 * 11 * 64 * 9 * 32 * 3
    dense = 2 * (1600 * 128 + 128 * 10) * 3
    assert sweep.train_flops(cnn, 1) == conv1 + conv2 + dense


def test_width_variant_changes_every_hidden_layer_and_nothing_else():
    v = sweep.width_variant(get_model("mnist_mlp"), 64)
    assert [layer.units for layer in v.layers] == [64, 64, 10]
    assert v.expected_params == 784 * 64 + 64 + 64 * 64 + 64 + 64 * 10 + 10
    assert v.optimizer == get_model("mnist_mlp").optimizer and v.name == "mnist_mlp_w64"
    with pytest.raises(cli.UserError, match="--widths needs an MLP"):
        sweep.width_variant(get_model("mnist_cnn"), 64)


@pytest.mark.parametrize("argv, message", [
    (["--backends", "numpy,nosuch"], "unknown backend 'nosuch'"),
    (["--batch-sizes", "1,0"], "positive integers"),
    (["--model", "mnist_cnn", "--widths", "32"], "--widths needs an MLP"),
    (["--batch-sizes", "", "--widths", ""], "nothing to sweep"),
    (["--device", "tpu"], "unknown device 'tpu'"),
    (["--threads", "-1"], "--threads"),
])
def test_bad_input_is_exit_2_before_any_work(tmp_path, capsys, argv, message):
    assert cli.main(["sweep", "--results-dir", str(tmp_path), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "raw").exists() or not list((tmp_path / "raw").glob("*.json"))


def test_a_small_sweep_writes_its_record_table_and_plots(tmp_path, monkeypatch, capsys):
    # numpy for real, a backend that fails at batch > 1 (the other points of that backend are kept), and one that is
    # not installed (a named skip)
    monkeypatch.setenv("DLCOMPARE_PLUGINS", "flaky=tests.fault_backend:FAULT=raise_on_large_batch")
    rc = cli.main(["sweep", "--backends", "numpy,flaky,cupy", "--batch-sizes", "1,4", "--widths", "16,32",
                   "--width-batch", "2", "--rounds", "2", "--steps", "2", "--results-dir", str(tmp_path)])
    assert rc == 1  # an error row
    (raw,) = (tmp_path / "raw").glob("*.json")
    rec = json.loads(raw.read_text())
    assert rec["kind"] == "sweep" and rec["peak"]["gflops"] > 0 and not rec["interrupted"]
    rows = {(r["backend"], r["sweep"], r["batch"], r["width"]): r for r in rec["rows"]}
    assert len(rows) == 3 * 4
    for key in [("numpy", "batch", 1, 256), ("numpy", "batch", 4, 256), ("numpy", "width", 2, 16),
                ("numpy", "width", 2, 32), ("flaky", "batch", 1, 256)]:
        r = rows[key]
        assert r["status"] == "ok", r
        assert r["timing"]["median_s"] > 0 and r["build_s"] > 0 and r["first_step_s"] > 0
        assert r["flops"] == sweep.train_flops(sweep.width_variant(get_model("mnist_mlp"), key[3]), key[2])
    assert rows[("flaky", "batch", 4, 256)]["status"] == "error"
    assert "planted failure" in rows[("flaky", "batch", 4, 256)]["reason"]
    assert rows[("cupy", "batch", 1, 256)]["status"] == "skipped"
    assert "cupy" in rows[("cupy", "batch", 1, 256)]["reason"]
    md = (tmp_path / "sweep-mnist_mlp.md").read_text()
    assert "## Batch sweep (hidden width 256)" in md and "## Width sweep (batch 2)" in md
    assert "## Crossovers (batch sweep)" in md and "planted failure" in md
    assert (tmp_path / "sweep-mnist_mlp-batch.png").stat().st_size > 1000
    assert (tmp_path / "sweep-mnist_mlp-flops.png").stat().st_size > 1000
    # harness report regenerates the same table from the raw record
    (tmp_path / "sweep-mnist_mlp.md").unlink()
    build_reports(tmp_path, plots=False)
    assert (tmp_path / "sweep-mnist_mlp.md").read_text().split("![")[0].rstrip() == md.split("![")[0].rstrip()


def _rec(times: dict) -> dict:
    rows = [{"backend": b, "sweep": "batch", "batch": batch, "width": 256, "flops": 10**6 * batch, "params": 1,
             "status": "ok", "timing": {"median_s": t, "iqr_s": 0.0}, "build_s": 0.1, "first_step_s": 0.1}
            for (b, batch), t in times.items()]
    return {"rows": rows}


def test_crossovers_name_the_fastest_per_range_of_batch_sizes():
    rec = _rec({("jax", 1): 1.0, ("tf1", 1): 2.0, ("jax", 2): 1.0, ("tf1", 2): 1.5,
                ("jax", 4): 3.0, ("tf1", 4): 1.0, ("jax", 8): 4.0, ("tf1", 8): 2.0})
    assert sweep.crossovers(rec) == [(1, 2, "jax", 2.0), (4, 8, "tf1", 3.0)]


def test_ctrl_c_keeps_the_finished_points(tmp_path):
    import os
    import signal
    import subprocess
    import sys

    from harness.runner import PROJECT_ROOT

    env = {**os.environ, "DLCOMPARE_PLUGINS": "hang=tests.fault_backend:FAULT=hang"}
    proc = subprocess.Popen([sys.executable, "-m", "harness", "sweep", "--backends", "numpy,hang,torch",
                             "--batch-sizes", "1,2", "--rounds", "1", "--steps", "1", "--results-dir", str(tmp_path)],
                            cwd=PROJECT_ROOT, env=env, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    seen = []
    for line in proc.stderr:  # numpy's two points, then the hanging backend
        seen.append(line)
        if line.startswith("  numpy batch 2"):
            break
    import time

    time.sleep(3)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, (seen, err)
    (raw,) = (tmp_path / "raw").glob("*.json")
    rec = json.loads(raw.read_text())
    assert rec["interrupted"]
    status = {(r["backend"], r["batch"]): r["status"] for r in rec["rows"]}
    assert status == {("numpy", 1): "ok", ("numpy", 2): "ok", ("hang", 1): "interrupted", ("hang", 2): "interrupted",
                      ("torch", 1): "interrupted", ("torch", 2): "interrupted"}
    assert "interrupted" in (tmp_path / "sweep-mnist_mlp.md").read_text()


def test_crossovers_of_the_width_sweep():
    rec = _rec({("jax", 1): 1.0, ("tf1", 1): 2.0})
    rec["rows"] += [{**r, "sweep": "width", "batch": 100, "width": w, "timing": {"median_s": t, "iqr_s": 0.0}}
                    for r, (w, t) in zip([rec["rows"][0], rec["rows"][1], rec["rows"][0], rec["rows"][1]],
                                         [(16, 1.0), (16, 1.2), (2048, 3.0), (2048, 2.0)])]
    assert sweep.crossovers(rec, "width") == [(16, 16, "jax", 1.2), (2048, 2048, "tf1", 1.5)]
    assert sweep.crossovers(rec) == [(1, 1, "jax", 2.0)]
