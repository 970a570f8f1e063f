"""A backend that misbehaves on purpose, in its real subprocess, for the robustness tests.

Registered through ``DLCOMPARE_PLUGINS=name=tests.fault_backend:FAULT=<kind>``; ``FAULT`` picks the misbehaviour.
Everything else is the NumPy backend.
"""

import dataclasses
import os
import signal
import time

import numpy as np

from backends import numpy_scratch
from backends.numpy_scratch import CAPABILITIES, probe  # noqa: F401  (the backend contract)

FAULT = os.environ.get("FAULT", "")
if FAULT == "import":
    raise ImportError("No module named 'fancyframework'")


def devices() -> list[str]:
    """FAKE_CUDA=1 claims a CUDA device (and computes on the CPU): a cell the Ray tests can place on a GPU node."""
    return ["cpu", "cuda"] if os.environ.get("FAKE_CUDA") else numpy_scratch.devices()


class Model(numpy_scratch.Model):
    def __init__(self, spec, weights, options):
        if FAULT == "segfault":
            os.kill(os.getpid(), signal.SIGSEGV)
        if os.environ.get("FAKE_CUDA"):
            options = dataclasses.replace(options, device="cpu")
        super().__init__(spec, weights, options)
        self.steps = 0

    def train_step(self, x, y):
        self.steps += 1
        if FAULT == "raise" and self.steps == 3:
            raise RuntimeError("CUDA error: an illegal memory access was encountered (planted)")
        if FAULT == "raise_on_large_batch" and len(x) > 1:
            raise RuntimeError("planted failure at batch size > 1")
        if FAULT == "hang" and self.steps == 2:
            time.sleep(3600)
        loss = super().train_step(x, y)
        if FAULT == "nondeterministic":  # an unseeded, ulp-sized perturbation, like a racy reduction
            self.params[0] += np.random.default_rng().normal(0, 1e-16, self.params[0].shape)
        if FAULT == "nan" and self.steps >= 4:
            self.params[2][...] = np.nan
            return float("nan")
        return loss
