"""Run test code under another Keras backend: KERAS_BACKEND is read once, at ``import keras``, so each backend needs a
process of its own (tests/test_backend_tf.py, tests/test_vocab_keras.py)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from harness.runner import PROJECT_ROOT


def in_keras_backend(backend: str, module: str, call: str, x64: bool = False, timeout: float = 600):
    """The JSON value of ``call``, an expression over ``t`` (the test module ``tests/<module>.py``), evaluated in a
    fresh process with ``KERAS_BACKEND=backend`` (and ``JAX_ENABLE_X64=1`` with ``x64``); skips where keras or the
    backend's framework is missing."""
    if not all(importlib.util.find_spec(m) is not None for m in ("keras", backend)):
        pytest.skip(f"keras and {backend} needed")
    env = {**os.environ, "KERAS_BACKEND": backend, "PYTHONPATH": str(PROJECT_ROOT), "TF_CPP_MIN_LOG_LEVEL": "2"}
    if x64:
        env["JAX_ENABLE_X64"] = "1"
    code = (f"import json, sys; sys.path.insert(0, 'tests'); import {module} as t; "
            f"print('RESULT ' + json.dumps({call}, default=str))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT "):])
