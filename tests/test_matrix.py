"""`harness matrix` and the executor seam without a Ray cluster: the local executor, bad input (exit 2), Ctrl-C in the
middle of a group, the speed table per run and node, the seed summary of the report. tests/test_ray.py runs the same
on a real two-node Ray cluster."""

import json
import sys

import numpy as np
import pytest

from harness import executors, report, runner
from harness.cli import main, parse_seeds
from harness.rows import Row
from harness.runner import UserError
from harness.status import Status


def run_cli(*args):
    return main([str(a) for a in args])


def records(results_dir):
    return [json.loads(p.read_text()) for p in sorted((results_dir / "raw").glob("*.json"))]


def test_parse_seeds():
    assert parse_seeds("0") == [0]
    assert parse_seeds("0,3,7") == [0, 3, 7]
    assert parse_seeds("2-4") == [2, 3, 4]
    assert parse_seeds("0-2,1,9") == [0, 1, 2, 9]
    for bad in ("", "a", "3-x", ",", "-1"):
        with pytest.raises(UserError, match="--seeds"):
            parse_seeds(bad)


def test_matrix_writes_one_ordinary_run_per_group(results_dir, capsys):
    rc = run_cli("matrix", "--models", "mlp_431,pima_mlp", "--dtypes", "float32,float64", "--seeds", "0,1",
                 "--backends", "numpy", "--steps", "3", "--no-timing", "--no-repeat", "--results-dir", results_dir)
    assert rc == 0
    recs = records(results_dir)
    groups = sorted((r["model"], r["dtype"], r["config"]["seed"]) for r in recs)
    assert groups == sorted((m, d, s) for m in ("mlp_431", "pima_mlp") for d in ("float32", "float64") for s in (0, 1))
    for rec in recs:
        assert rec["kind"] == "compare" and rec["executor"] == "local"
        assert {r["status"] for r in rec["rows"]} == {Status.PASS}
        assert all(r["node"]["executor"] == "local" and r["node"]["cores"] >= 1 for r in rec["rows"])
        assert (results_dir / "raw" / f"{rec['run_id']}.npz").exists()
    out = capsys.readouterr().out
    assert "8 run(s) written" in out
    # the seeds are merged by the report: one line per row key, two seeds each
    report.build_reports(results_dir, models=["mlp_431"], plots=False)
    md = (results_dir / "mlp_431.md").read_text()
    assert "## Across seeds" in md and "| 0, 1 " in md


def test_the_same_cell_computes_the_same_numbers_in_compare_and_matrix(results_dir):
    a, b = results_dir / "a", results_dir / "b"
    assert run_cli("compare", "--model", "mlp_431", "--backends", "numpy", "--no-timing", "--results-dir", a) == 0
    assert run_cli("matrix", "--models", "mlp_431", "--backends", "numpy", "--no-timing", "--results-dir", b) == 0
    (za,), (zb,) = (list((d / "raw").glob("*.npz")) for d in (a, b))
    with np.load(za) as fa, np.load(zb) as fb:
        assert sorted(fa.files) == sorted(fb.files)
        for k in fa.files:
            np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


@pytest.mark.parametrize("args, expected", [
    (["--dtypes", "float16"], "--dtypes must be"),
    (["--modes", "eager"], "--modes must be"),
    (["--seeds", "x"], "--seeds must be"),
    (["--models", "nope"], "nope"),
    (["--models", ","], "--models must name"),
    (["--backends", "numpy,nope"], "nope"),
    (["--ray-address", "127.0.0.1:1"], "--ray-address needs --executor ray"),
])
def test_matrix_bad_input_exits_2_before_any_work(results_dir, capsys, args, expected):
    assert run_cli("matrix", "--no-timing", "--results-dir", results_dir, *args) == 2
    assert expected in capsys.readouterr().err
    assert not (results_dir / "raw").exists() or not list((results_dir / "raw").iterdir())


def test_executor_ray_without_ray_says_how_to_install_it(monkeypatch, results_dir, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    assert run_cli("compare", "--model", "mlp_431", "--backends", "numpy", "--executor", "ray",
                   "--results-dir", results_dir) == 2
    err = capsys.readouterr().err
    assert "Ray, which is not installed" in err and "pip install" in err and "'.[ray]'" in err


def test_a_ray_address_where_nothing_listens_fails_fast(results_dir, capsys):
    pytest.importorskip("ray")
    import socket
    import time

    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t = time.perf_counter()
    assert run_cli("matrix", "--models", "mlp_431", "--backends", "numpy", "--executor", "ray", "--ray-address",
                   f"127.0.0.1:{port}", "--results-dir", results_dir) == 2
    assert time.perf_counter() - t < 30
    assert f"no Ray cluster answers at '127.0.0.1:{port}'" in capsys.readouterr().err


class _InterruptingExecutor:
    """Runs the oracle and the first cell of a group for real, then the user presses Ctrl-C in the second cell."""

    name = "fake"

    def run(self, groups, on_oracle, on_cell, progress):
        (g,) = groups
        on_oracle(g, executors.oracle_work(g.job, g.cfg, g.options))
        on_cell(g.cells[0], executors.cell_work(g.spec, g.job, g.oracle, g.cells[0], {"executor": "fake"}))
        on_cell(g.cells[1], executors.placeholder_rows(g.cells[1], Status.INTERRUPTED, "interrupted by the user"))
        raise KeyboardInterrupt

    def close(self):
        pass


def test_ctrl_c_in_the_last_cell_marks_the_group_interrupted_and_keeps_the_finished_rows():
    cfg = runner.CompareConfig(model="mlp_431", backends=["numpy", "numpy"], steps=3, timing=False, repeat=False)
    handed = []
    (res,) = executors.run_groups([cfg], _InterruptingExecutor(), on_group=handed.append)
    assert res["interrupted"] and handed == [res]  # written once, as interrupted
    first, second = res["rows"][:2], res["rows"][2:]
    assert {r.status for r in first} == {Status.PASS}
    assert {r.status for r in second} == {Status.INTERRUPTED}


def _timed(backend, median, run_id, node):
    return Row(backend=backend, dtype="float32", mode="aligned", batch_size=1, device="cpu", seed=0,
               status=Status.PASS, node=node,
               meta={"timing": {"median_s": median, "iqr_s": 0.0, "samples_per_s": 1 / median, "warmup_s": 0.1,
                                "peak_rss_mb": 100.0}}).to_dict() | {"run_id": run_id}


def test_x_fastest_never_divides_times_of_different_runs_or_nodes():
    big = {"executor": "ray", "hostname": "big", "cores": 64, "gpus": [], "ray_node": "aaaaaaaaaa"}
    small = {"executor": "ray", "hostname": "small", "cores": 2, "gpus": [], "ray_node": "bbbbbbbbbb"}
    rows = [_timed("torch", 0.001, "r1", big), _timed("jax", 0.004, "r1", small), _timed("numpy", 0.008, "r1", small),
            _timed("tf1", 0.0005, "r2", big)]
    table, headers = report.speed_rows(rows)
    assert headers[:2] == ["run", "node"]
    x = {r[headers.index("backend")]: float(r[-1]) for r in table}
    # torch is alone on the big node of r1, tf1 alone in r2; numpy is 2x jax on the same small node
    assert x == {"torch": 1.0, "jax": 1.0, "numpy": 2.0, "tf1": 1.0}
    one_node = [_timed("jax", 0.004, "r1", small), _timed("numpy", 0.008, "r1", small)]
    table, headers = report.speed_rows(one_node)
    assert "run" not in headers and "node" not in headers


class _BrokenExecutor(_InterruptingExecutor):
    """The executor itself fails after the first cell (a cluster lost mid-run, a bug)."""

    def run(self, groups, on_oracle, on_cell, progress):
        (g,) = groups
        on_oracle(g, executors.oracle_work(g.job, g.cfg, g.options))
        on_cell(g.cells[0], executors.cell_work(g.spec, g.job, g.oracle, g.cells[0], {"executor": "fake"}))
        raise RuntimeError("connection to the cluster lost")


def test_a_failing_executor_keeps_the_finished_cells_and_names_itself_in_the_others():
    cfg = runner.CompareConfig(model="mlp_431", backends=["numpy", "numpy"], steps=3, timing=False, repeat=False)
    handed, lines = [], []
    (res,) = executors.run_groups([cfg], _BrokenExecutor(), progress=lines.append, on_group=handed.append)
    assert handed == [res] and not res["interrupted"]
    first, second = res["rows"][:2], res["rows"][2:]
    assert {r.status for r in first} == {Status.PASS}
    assert {r.status for r in second} == {Status.ERROR}
    assert all("the fake executor failed: RuntimeError: connection to the cluster lost" in r.reason for r in second)
    assert any("connection to the cluster lost" in ln for ln in lines)


def _cell(device, timed):
    return executors.Cell(group=0, index=0, backend="torch", device=device, runs=[], options={}, timeout=60.0,
                          timed=timed)


def test_ray_placement_timed_cells_hold_a_whole_node_and_cuda_cells_a_gpu(monkeypatch):
    pytest.importorskip("ray")
    ex = executors.RayExecutor()  # no address: nothing is started until a run
    cpu_node, gpu_node, small_node = "a1" * 28, "b2" * 28, "c3" * 28  # Ray node ids are 56 hex digits
    nodes = [{"NodeID": cpu_node, "Resources": {"CPU": 8.0}},
             {"NodeID": gpu_node, "Resources": {"CPU": 16.0, "GPU": 2.0}},
             {"NodeID": small_node, "Resources": {"CPU": 2.0}}]
    monkeypatch.setattr(ex, "nodes", lambda: nodes)
    assert ex.placement(_cell("cpu", False)) == {"num_cpus": 1, "num_gpus": 0}
    assert ex.placement(_cell("cuda", False)) == {"num_cpus": 1, "num_gpus": 1}
    timed_cpu = [ex.placement(_cell("cpu", True)) for _ in range(4)]
    assert [(p["num_cpus"], p["num_gpus"], p["scheduling_strategy"].node_id) for p in timed_cpu] == [
        (8.0, 0, cpu_node), (16.0, 0, gpu_node), (2.0, 0, small_node), (8.0, 0, cpu_node)]
    assert all(p["scheduling_strategy"].soft is False for p in timed_cpu)
    timed_cuda = ex.placement(_cell("cuda", True))
    assert (timed_cuda["num_cpus"], timed_cuda["num_gpus"], timed_cuda["scheduling_strategy"].node_id) == (
        16.0, 2.0, gpu_node)
    monkeypatch.setattr(ex, "nodes", lambda: nodes[::2])  # no GPU anywhere
    assert ex.placement(_cell("cuda", False)) is None and ex.placement(_cell("cuda", True)) is None


def test_ray_warns_once_per_node_that_runs_another_commit(monkeypatch):
    pytest.importorskip("ray")
    ex = executors.RayExecutor()
    lines = []
    node = {"hostname": "n1", "cores": 4, "gpus": [], "ray_node": "ab" * 28, "commit": "0123456789ab"}
    ex._commit = "fedcba987654"
    ex._check_commit(node, lines.append)
    ex._check_commit(node, lines.append)
    ex._check_commit({**node, "ray_node": "cd" * 28, "commit": "fedcba987654"}, lines.append)  # the same commit
    ex._check_commit({**node, "ray_node": "ef" * 28, "commit": None}, lines.append)  # not a git checkout: unknown
    assert len(lines) == 1 and "runs dlcompare 0123456789ab, this command fedcba987654" in lines[0]
