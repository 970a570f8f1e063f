"""The NumPy backend with a ``to_device`` and a log of the calls the timers make, for tests/test_timing.py.

Registered through ``DLCOMPARE_PLUGINS=name=tests.timing_backend:TIMING_LOG=<path>``: every ``to_device``, ``sync``
and ``train_steps`` call is appended to that file as one line; ``train_steps`` says whether it was handed the staged
batches (what ``to_device`` returned) or raw ones.
"""

import os

import numpy as np

from backends import numpy_scratch
from backends.numpy_scratch import CAPABILITIES, devices, probe  # noqa: F401  (the backend contract)


class Staged(np.ndarray):
    """An array that went through ``to_device`` (a view: the values are the same)."""


class Model(numpy_scratch.Model):
    def _log(self, what: str) -> None:
        path = os.environ.get("TIMING_LOG")
        if path:
            with open(path, "a") as f:
                f.write(what + "\n")

    def to_device(self, xs, ys):
        self._log("to_device")
        return np.asarray(xs).view(Staged), np.asarray(ys).view(Staged)

    def sync(self) -> None:
        self._log("sync")
        super().sync()

    def train_steps(self, xs, ys):
        self._log("train staged" if isinstance(xs, Staged) and isinstance(ys, Staged) else "train raw")
        return super().train_steps(np.asarray(xs), np.asarray(ys))
