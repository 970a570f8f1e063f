"""`--executor ray` against a real Ray cluster started on this machine: a head node (1 CPU) and a second node (1 CPU
and one advertised GPU, which has no CUDA device behind it), each with its own temp dir.

The faults are real: a backend's worker process killed by SIGKILL, the Ray worker process that runs a cell killed
(its task dies), a hang that times out, Ctrl-C in the driver, and the GPU node killed mid-run. The test stops only the
processes of its own cluster (never `ray stop`, which would stop every Ray cluster of the machine's user)."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from harness.cli import main
from harness.runner import PROJECT_ROOT
from harness.status import Status

pytest.importorskip("ray")

RAY = str(Path(sys.executable).with_name("ray"))
FAULTS = ("killed=tests.fault_backend:FAULT=hang,taskkilled=tests.fault_backend:FAULT=hang,"
          "hung=tests.fault_backend:FAULT=hang,doomed=tests.fault_backend:FAULT=hang:FAKE_CUDA=1")


# ------------------------------------------------------------------------------------------------- processes
def _processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every process we can read."""
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        out[int(d.name)] = (ppid, cmd)
    return out


def _with_descendants(pids: set[int], procs: dict) -> set[int]:
    out, grew = set(pids), True
    while grew:
        more = {p for p, (pp, _) in procs.items() if pp in out and p not in out}
        out |= more
        grew = bool(more)
    return out


def _kill_processes_mentioning(*markers: str) -> None:
    """SIGKILL every process whose command line mentions a marker, and their descendants (Ray's workers, their
    backend subprocesses)."""
    procs = _processes()
    roots = {p for p, (_, cmd) in procs.items() if any(m in cmd for m in markers) and p != os.getpid()}
    for p in _with_descendants(roots, procs):
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _backend_workers(backend: str, device: str | None = None) -> list[tuple[int, int]]:
    """(pid, parent pid) of the `harness.worker` subprocesses running ``backend`` (on ``device``)."""
    out = []
    for pid, (ppid, cmd) in _processes().items():
        if "harness.worker" not in cmd or f"{os.sep}{backend}-" not in cmd:
            continue
        job = Path(cmd.split()[-1]) / "job.json"
        try:
            runs = json.loads(job.read_text())["runs"]
        except (OSError, ValueError, KeyError):
            continue
        if device is None or runs[0]["device"] == device:
            out.append((pid, ppid))
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------------- the cluster
@dataclass
class Cluster:
    address: str
    env: dict
    head_dir: str
    gpu_dir: str
    gpu_node: str  # the Ray node id of the node that advertises a GPU


def _ray_cli(env: dict, *args: str) -> None:
    proc = subprocess.run([RAY, *args], env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"ray {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"


@pytest.fixture(scope="module")
def cluster():
    port = _free_port()
    # Ray's Unix socket paths must stay short: a temp dir of its own under the system's, not pytest's deep tmp_path
    head_dir = tempfile.mkdtemp(prefix="dlc-ray-head-")
    gpu_dir = tempfile.mkdtemp(prefix="dlc-ray-gpu-")
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
               PYTHONPATH=os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")])))
    env.pop("RAY_ADDRESS", None)
    common = ["--num-cpus=1", "--disable-usage-stats", "--object-store-memory=100000000"]
    try:
        _ray_cli(env, "start", "--head", f"--port={port}", "--include-dashboard=false", f"--temp-dir={head_dir}",
                 *common)
        _ray_cli(env, "start", f"--address=127.0.0.1:{port}", "--num-gpus=1", f"--temp-dir={gpu_dir}", *common)
        (gpu_node,) = {arg.split("=", 1)[1] for _, cmd in _processes().values() if "raylet" in cmd and gpu_dir in cmd
                       for arg in cmd.split() if arg.startswith("--node_id=")}
        yield Cluster(f"127.0.0.1:{port}", env, head_dir, gpu_dir, gpu_node)
    finally:
        _kill_processes_mentioning(head_dir, gpu_dir, f"127.0.0.1:{port}", f":{port} --host")
        time.sleep(1)
        shutil.rmtree(head_dir, ignore_errors=True)
        shutil.rmtree(gpu_dir, ignore_errors=True)


class Driver:
    """`harness matrix --executor ray` in its own process, its stderr read as it comes."""

    def __init__(self, cluster: Cluster, results_dir: Path, *args: str):
        env = dict(cluster.env, DLCOMPARE_PLUGINS=FAULTS)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "harness", "matrix", "--models", "mlp_431", "--dtypes", "float64", "--steps", "5",
             "--no-timing", "--no-repeat", "--executor", "ray", "--ray-address", cluster.address,
             "--results-dir", str(results_dir), *args],
            cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # Ctrl-C as in a terminal
        self.err: list[str] = []
        self._reader = threading.Thread(target=lambda: self.err.extend(iter(self.proc.stderr.readline, "")),
                                        daemon=True)
        self._reader.start()

    @property
    def stderr(self) -> str:
        return "".join(self.err)

    def wait_for(self, what, timeout: float = 180.0):
        """Poll ``what()`` until it returns something truthy (returned), the driver exits or ``timeout`` passes."""
        deadline = time.time() + timeout
        while time.time() < deadline and self.proc.poll() is None:
            got = what()
            if got:
                return got
            time.sleep(0.2)
        pytest.fail(f"gave up waiting (driver exit code {self.proc.poll()}); its stderr:\n{self.stderr}")

    def finish(self, timeout: float = 240.0) -> tuple[int, str, str]:
        out = self.proc.stdout.read()
        rc = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=10)
        return rc, out, self.stderr


def only_record(results_dir: Path) -> dict:
    (path,) = (results_dir / "raw").glob("*.json")
    return json.loads(path.read_text())


def rows_of(record: dict) -> dict[tuple[str, str, int], dict]:
    return {(r["backend"], r["device"], r["batch_size"]): r for r in record["rows"]}


def assert_no_worker_left(*backends: str, timeout: float = 15.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and any(_backend_workers(b) for b in backends):
        time.sleep(0.25)
    assert not any(_backend_workers(b) for b in backends), "a backend subprocess outlived its cell"


# ------------------------------------------------------------------------------------------------- the tests
@pytest.fixture(scope="module")
def faulty_run(cluster, tmp_path_factory):
    """numpy and three faulty backends on cpu and cuda: `killed`'s worker process is killed, `taskkilled`'s Ray
    worker (the task's process) is killed, `hung` hangs until --timeout."""
    results_dir = tmp_path_factory.mktemp("faulty") / "results"
    driver = Driver(cluster, results_dir, "--backends", "numpy,killed,taskkilled,hung", "--device", "all",
                    "--timeout", "40")
    (pid, _), = driver.wait_for(lambda: _backend_workers("killed", "cpu"))
    os.kill(pid, signal.SIGKILL)
    (_, ray_worker), = driver.wait_for(lambda: _backend_workers("taskkilled", "cpu"))
    os.kill(ray_worker, signal.SIGKILL)
    rc, out, err = driver.finish()
    return rc, out, err, only_record(results_dir), results_dir


def test_each_fault_is_an_error_row_with_its_reason_and_every_other_cell_completes(faulty_run):
    rc, out, err, record, _ = faulty_run
    assert rc == 1, err  # error rows: exit 1, not a crash of the harness
    rows = rows_of(record)
    assert len(rows) == 4 * 2 * 2  # 4 backends x cpu, cuda x batch 1, 3: no cell lost
    for b in (1, 3):
        assert rows[("numpy", "cpu", b)]["status"] == Status.PASS
        assert rows[("killed", "cpu", b)]["status"] == Status.ERROR
        assert "killed by signal SIGKILL" in rows[("killed", "cpu", b)]["reason"]
        assert rows[("taskkilled", "cpu", b)]["status"] == Status.ERROR
        assert "the Ray task failed" in rows[("taskkilled", "cpu", b)]["reason"]
        assert rows[("hung", "cpu", b)]["status"] == Status.ERROR
        assert "timeout: no result after 40 s" in rows[("hung", "cpu", b)]["reason"]
    # failures are shown as they happen, with the cells done / running / queued
    assert "done," in err and "running," in err and "queued]" in err
    assert "killed cpu: batch 1 error" in err and "killed by signal SIGKILL" in err
    assert_no_worker_left("killed", "taskkilled", "hung")


def test_cuda_cells_go_to_the_gpu_node_and_say_there_is_no_cuda_device(faulty_run, cluster):
    _, _, _, record, _ = faulty_run
    cuda = [r for r in record["rows"] if r["device"] == "cuda"]
    assert len(cuda) == 8
    for r in cuda:
        assert r["status"] == Status.SKIPPED and r["reason"] == "no CUDA device", r
        assert r["node"]["ray_node"] == cluster.gpu_node  # placed by the GPU it asked for
    cpu_nodes = {r["node"]["ray_node"] for r in record["rows"] if r["device"] == "cpu" and r.get("node")}
    assert cpu_nodes  # each row records where it ran
    assert record["executor"] == "ray"


def test_rows_computed_on_ray_are_bit_identical_to_local_ones(faulty_run, results_dir):
    _, _, _, record, ray_dir = faulty_run
    assert record["config"]["threads"] == 1  # on Ray an agreement-only cell holds one CPU and uses one thread
    assert main(["matrix", "--models", "mlp_431", "--dtypes", "float64", "--steps", "5", "--no-timing", "--no-repeat",
                 "--threads", "1", "--backends", "numpy", "--results-dir", str(results_dir)]) == 0
    local = only_record(results_dir)
    for b in (1, 3):
        assert rows_of(record)[("numpy", "cpu", b)]["losses"] == rows_of(local)[("numpy", "cpu", b)]["losses"]
    # the arrays: initial weights, batch orders, every loss and final weight of the numpy rows, bit for bit
    (ray_npz,), (local_npz,) = (list((d / "raw").glob("*.npz")) for d in (ray_dir, results_dir))
    with np.load(ray_npz) as r, np.load(local_npz) as lo:
        keys = [k for k in lo.files if not k.startswith("numpy|") or "|cpu|" in k]
        assert any(k.startswith("numpy|") for k in keys) and any(k.startswith("init/") for k in keys)
        for k in keys:
            np.testing.assert_array_equal(r[k], lo[k], err_msg=k)


def test_ctrl_c_cancels_the_rest_and_keeps_the_finished_cells(cluster, results_dir):
    driver = Driver(cluster, results_dir, "--backends", "numpy,hung", "--device", "cpu", "--timeout", "300")
    driver.wait_for(lambda: _backend_workers("hung", "cpu") and "numpy cpu: batch 1 pass" in driver.stderr)
    driver.proc.send_signal(signal.SIGINT)
    rc, out, err = driver.finish()
    assert rc == 130, err
    assert "interrupted: finished groups and cells were saved" in err
    rows = rows_of(only_record(results_dir))
    for b in (1, 3):
        assert rows[("numpy", "cpu", b)]["status"] == Status.PASS
        assert rows[("hung", "cpu", b)]["status"] == Status.INTERRUPTED
    assert_no_worker_left("hung")


def test_a_node_that_disappears_makes_error_rows_for_its_cells_only(cluster, results_dir):
    """Runs last: it kills the GPU node of the module's cluster."""
    driver = Driver(cluster, results_dir, "--backends", "doomed,numpy", "--device", "cuda", "--timeout", "300")
    driver.wait_for(lambda: _backend_workers("doomed", "cuda"))
    _kill_processes_mentioning(cluster.gpu_dir)  # the node's raylet, its workers and their subprocesses
    rc, out, err = driver.finish()
    assert rc == 1, err
    assert (results_dir / "raw").exists(), err
    rows = rows_of(only_record(results_dir))
    assert len(rows) == 2 * 2
    for b in (1, 3):
        assert rows[("doomed", "cuda", b)]["status"] == Status.ERROR
        assert "the Ray task failed" in rows[("doomed", "cuda", b)]["reason"]
        # the numpy cell ran before the node died (no CUDA device there), or waited for a GPU that no longer exists
        numpy_row = rows[("numpy", "cuda", b)]
        assert (numpy_row["status"], numpy_row["reason"]) == (Status.SKIPPED, "no CUDA device") or (
            numpy_row["status"] == Status.ERROR and "no node of the Ray cluster has a GPU any more" in numpy_row["reason"])
