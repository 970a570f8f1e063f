"""Options, parametrisation and the per-backend worker processes of the pytest-benchmark suite (``test_bench.py``).

Only ``pytest benchmarks/`` loads this file: the project's own ``pytest`` (``testpaths = ["tests"]``) never collects
``benchmarks/``.
"""

from __future__ import annotations

import json
import select
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import backends  # noqa: E402
from harness import runner  # noqa: E402
from models import get_model  # noqa: E402

BENCH_BACKENDS = ("numpy", "tf1", "tf2", "keras", "keras-jax", "keras-torch", "torch", "jax")
BENCH_MODELS = ("mnist_mlp", "mnist_cnn")


def pytest_addoption(parser):
    g = parser.getgroup("dlcompare benchmarks")
    g.addoption("--bench-backends", default=",".join(BENCH_BACKENDS), help="comma-separated backends (default: all)")
    g.addoption("--bench-models", default=",".join(BENCH_MODELS), help="comma-separated models (default: MNIST MLP, CNN)")
    g.addoption("--bench-batch-sizes", default="1,N", help="comma-separated; N = the model's large batch (default 1,N)")
    g.addoption("--bench-dtype", default=None, choices=("float32", "float64"), help="default: the model's")
    g.addoption("--bench-steps", type=int, default=10, help="train steps per timed round (default 10)")
    g.addoption("--bench-rounds", type=int, default=5, help="timed rounds per case (default 5)")
    g.addoption("--bench-warmup", type=int, default=1, help="warm-up rounds per case, not timed (default 1)")
    g.addoption("--bench-threads", type=int, default=1, help="intra-op threads, set as the harness's --threads sets them "
                                                            "(default 1); 0: each framework's default")
    g.addoption("--bench-timeout", type=float, default=600.0, help="seconds per worker command (default 600)")


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def pytest_generate_tests(metafunc):
    if "case" not in metafunc.fixturenames:
        return
    opt = metafunc.config.getoption
    names, models = _csv(opt("--bench-backends")), _csv(opt("--bench-models"))
    for b in names:
        try:
            backends.get_info(b)
        except ValueError as e:  # says which names are valid
            raise pytest.UsageError(f"--bench-backends: {e}") from None
    for m in models:
        try:
            get_model(m)
        except ValueError as e:
            raise pytest.UsageError(f"--bench-models: {e}") from None
    params = []
    for b in names:  # grouped by backend: one worker process alive at a time
        for m in models:
            spec = get_model(m)
            sizes = []
            for s in _csv(opt("--bench-batch-sizes")):
                if s.upper() != "N" and not (s.isdigit() and int(s) > 0):
                    raise pytest.UsageError(f"--bench-batch-sizes: {s!r} is neither a positive integer nor N")
                size = max(spec.batch_sizes) if s.upper() == "N" else int(s)
                if size not in sizes:
                    sizes.append(size)
            for bs in sizes:
                marks = [pytest.mark.slow] if (len(spec.input_shape) == 3 and bs > 1) else []
                params.append(pytest.param((b, m, bs), id=f"{b}-{m}-b{bs}", marks=marks))
    metafunc.parametrize("case", params)


@pytest.fixture(scope="session")
def bench_options(pytestconfig) -> dict:
    opt = pytestconfig.getoption
    out = {k: opt(f"--bench-{k}") for k in ("dtype", "steps", "rounds", "warmup", "threads", "timeout")}
    for k in ("steps", "rounds"):
        if out[k] < 1:
            raise pytest.UsageError(f"--bench-{k} must be at least 1, got {out[k]}")
    if out["warmup"] < 0:
        raise pytest.UsageError(f"--bench-warmup must be at least 0, got {out['warmup']}")
    out["threads"] = out["threads"] or None
    return out


class WorkerError(RuntimeError):
    pass


class Worker:
    """One ``_bench_worker.py`` subprocess for one backend, with the environment the harness gives that backend."""

    def __init__(self, backend: str, dtype: str, threads: int | None, timeout: float):
        self.key = (backend, dtype, threads)
        self.timeout = timeout
        self.log = tempfile.TemporaryFile(mode="w+")
        env = runner.subprocess_env(backend, dtype, threads)
        self.proc = subprocess.Popen([sys.executable, str(HERE / "_bench_worker.py"), backend], cwd=str(ROOT),
                                     env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                     text=True, bufsize=1)

    def request(self, cmd: dict) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], self.timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            what = "no answer in %g s" % self.timeout if not ready else f"exit code {self.proc.poll()}"
            raise WorkerError(f"{self.key[0]} worker: {what} to {cmd['cmd']!r}; stderr tail:\n{self.stderr_tail()}")
        return json.loads(line)

    def stderr_tail(self, lines: int = 15) -> str:
        self.log.seek(0)
        return "\n".join(self.log.read().strip().splitlines()[-lines:])

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self.log.close()


class WorkerPool:
    """At most one live worker: asking for another backend closes the previous one (memory, idle thread pools)."""

    def __init__(self):
        self.current: Worker | None = None

    def get(self, backend: str, dtype: str, threads: int | None, timeout: float) -> Worker:
        key = (backend, dtype, threads)
        if self.current is not None and (self.current.key != key or self.current.proc.poll() is not None):
            self.current.close()
            self.current = None
        if self.current is None:
            self.current = Worker(backend, dtype, threads, timeout)
        return self.current

    def close(self) -> None:
        if self.current is not None:
            self.current.close()
            self.current = None


@pytest.fixture(scope="session")
def workers():
    pool = WorkerPool()
    yield pool
    pool.close()

