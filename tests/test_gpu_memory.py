"""``Model.gpu_peak_mb()`` (backends/base.py): the peak device memory in MiB a backend's framework allocated on the
model's CUDA device in this process, or None on the CPU, so that CPU rows of the speed table keep no GPU column.

* CPU: every installed backend (numpy, tf1, tf2, keras on TensorFlow, torch and JAX in this process; Keras on JAX and
  on torch in one fresh process each, KERAS_BACKEND being read at ``import keras``) returns None after a train step,
  and ``harness.timing.gpu_peak_mb`` passes that on.
* CUDA: the same backends, and cupy (the NumPy backend with ``DLCOMPARE_ARRAY_MODULE=cupy``, in a process of its
  own), return a positive float after a train step on ``device="cuda"``; skipped, saying why, where no CUDA device
  is visible to the framework.

The model is the 19-parameter ``mlp_431`` in float32 (JAX in this process has no float64), one step on its toy set.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from backends.base import BuildOptions
from harness.runner import PROJECT_ROOT
from models import get_model, init_weights
from tests.keras_subprocess import in_keras_backend

IN_PROCESS = {"numpy": ("backends.numpy_scratch", "numpy"), "tf1": ("backends.tf1_graph", "tensorflow"),
              "tf2": ("backends.tf2_tape", "tensorflow"), "keras": ("backends.keras_api", "tensorflow"),
              "torch": ("backends.torch_eager", "torch"), "jax": ("backends.jax_jit", "jax")}
KERAS_SUBPROCESS = {"keras-jax": "jax", "keras-torch": "torch"}  # backend name -> KERAS_BACKEND

X = np.array([[1, 0, 1, 0], [1, 0, 1, 1], [0, 1, 0, 1]], np.float32)  # the toy_431 set
Y = np.array([[1], [1], [0]], np.float32)


def peak_after_step(mod, device: str):
    """``gpu_peak_mb()`` of a fresh mlp_431 on ``device`` after one train step (device work finished)."""
    spec = get_model("mlp_431")
    model = mod.Model(spec, init_weights(spec, 0), BuildOptions(dtype="float32", device=device))
    model.train_step(X, Y)
    model.sync()
    return model.gpu_peak_mb()


def peaks(module: str) -> dict:
    """Run in a fresh process (Keras on JAX / torch, cupy): ``peak_after_step`` on each device, or why not there."""
    mod = importlib.import_module(module)
    have = mod.devices()
    return {"backend": mod.BACKEND,
            **{d: peak_after_step(mod, d) if d in have and d in mod.CAPABILITIES.devices
               else f"no {d.upper()} device visible to {_label(mod)}" for d in ("cpu", "cuda")}}


def _label(mod) -> str:
    name = getattr(mod, "NAME", mod.BACKEND)  # keras_api: "keras", "keras-jax", "keras-torch"
    return name if name == mod.BACKEND else f"{name} (Keras on {mod.BACKEND})"


def _module(name: str, request):
    module, framework = IN_PROCESS[name]
    if name == "keras":
        request.getfixturevalue("keras_tf")  # Keras on TensorFlow in this process (skips otherwise), floatx restored
    else:
        pytest.importorskip(framework)
    return importlib.import_module(module)


_KERAS_RUNS: dict[str, dict] = {}


def _keras_subprocess(name: str) -> dict:
    """``peaks`` of Keras on JAX / torch, one process per backend for the whole file (both devices at once)."""
    if name not in _KERAS_RUNS:
        _KERAS_RUNS[name] = in_keras_backend(KERAS_SUBPROCESS[name], "test_gpu_memory",
                                             "t.peaks('backends.keras_api')", timeout=300)
    out = _KERAS_RUNS[name]
    assert out["backend"] == KERAS_SUBPROCESS[name], out
    return out


def _cupy_subprocess() -> dict:
    if importlib.util.find_spec("cupy") is None:
        pytest.skip("cupy is not installed (pip install cupy-cuda12x; needs an NVIDIA GPU)")
    env = {**os.environ, "DLCOMPARE_ARRAY_MODULE": "cupy", "PYTHONPATH": str(PROJECT_ROOT)}
    code = ("import json, sys; sys.path.insert(0, 'tests'); import test_gpu_memory as t; "
            "print('RESULT ' + json.dumps(t.peaks('backends.numpy_scratch'), default=str))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    out = json.loads(lines[-1][len("RESULT "):])
    assert out["backend"] == "cupy", out
    return out


# ----------------------------------------------------------------------------------------------------------- the CPU
@pytest.mark.parametrize("name", list(IN_PROCESS))
def test_cpu_model_has_no_gpu_peak(name, request):
    from harness.timing import gpu_peak_mb

    mod = _module(name, request)
    spec = get_model("mlp_431")
    model = mod.Model(spec, init_weights(spec, 0), BuildOptions(dtype="float32", device="cpu"))
    model.train_step(X, Y)
    model.sync()
    assert model.gpu_peak_mb() is None
    assert gpu_peak_mb(model) is None  # what the timing protocol records: no GPU column on a CPU row


@pytest.mark.parametrize("name", list(KERAS_SUBPROCESS))
def test_cpu_keras_subprocess_has_no_gpu_peak(name):
    assert _keras_subprocess(name)["cpu"] is None


# ---------------------------------------------------------------------------------------------------------- CUDA
def _check_cuda_peak(peak, jax_based: bool = False) -> None:
    if isinstance(peak, str):
        pytest.skip(peak)
    if peak is None and jax_based and os.environ.get("XLA_PYTHON_CLIENT_ALLOCATOR") == "platform":
        pytest.skip("XLA_PYTHON_CLIENT_ALLOCATOR=platform keeps no peak_bytes_in_use (gpu_peak_mb is None)")
    assert isinstance(peak, float) and peak > 0, peak


@pytest.mark.parametrize("name", list(IN_PROCESS))
def test_cuda_peak_is_positive(name, request):
    if name == "numpy":
        pytest.skip("the numpy backend runs on the CPU only; its CUDA form is cupy (test_cuda_peak_cupy)")
    mod = _module(name, request)
    if "cuda" not in mod.devices():
        pytest.skip(f"no CUDA device visible to {_label(mod)}")
    _check_cuda_peak(peak_after_step(mod, "cuda"), jax_based=name == "jax")


@pytest.mark.parametrize("name", list(KERAS_SUBPROCESS))
def test_cuda_peak_is_positive_keras_subprocess(name):
    _check_cuda_peak(_keras_subprocess(name)["cuda"], jax_based=name == "keras-jax")


def test_cuda_peak_cupy():
    _check_cuda_peak(_cupy_subprocess()["cuda"])


def test_xla_peak_reads_the_statistic_or_says_none():
    """JAX and Keras on JAX read XLA's memory_stats() through one function: bytes in MiB, None where the allocator
    keeps no such statistic (no stats, no key, -1)."""
    from backends.base import xla_peak_mb

    assert xla_peak_mb({"peak_bytes_in_use": 3 * 2**20}) == 3.0
    assert xla_peak_mb(None) is None and xla_peak_mb({}) is None and xla_peak_mb({"peak_bytes_in_use": -1}) is None
