"""The agreement policy, one entry per dtype: how far outside the measured rounding envelope a run may go.

A check passes when ``max|backend - oracle64| <= multiple * envelope + floor_ulps * eps(dtype) * scale``, where the
envelope is the largest distance of the oracle's own rounding variants (run in the same dtype, in the same run) to the
float64 oracle at that check, and ``scale`` is the largest magnitude of the whole set observed at that step (all
gradients, all weights, the loss, the predictions); see ``harness/agreement.py``.

Both numbers are justified by ``results/calibration.md`` (written by ``harness calibrate`` on this project's CPU
machine, with its commit, versions and seeds): "noise" there is the largest ratio ``max|backend - oracle| /
envelope`` seen over correct backends and seeds, "bug" the smallest such ratio of a planted bug.  The multiple sits
between the two with a margin on each side; the floor is the part of the bound no envelope can see (checks where
every variant happens to round exactly like the oracle).  No entry is ever widened to turn a red row green: find the
cause instead.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Policy:
    early_multiple: float  # allowed distance in units of the envelope at steps 0 and 1 (before any chaos can act)
    late_multiple: float  # ... after step 1, where a ReLU that switches in one run and not another can jump
    floor_ulps: float  # what no envelope can see, in rounding units of each element
    why: str

    def multiple(self, step: int) -> float:
        return self.early_multiple if step <= 1 else self.late_multiple


POLICY: dict[str, Policy] = {
    "float32": Policy(16.0, 256.0, 8.0, "see results/calibration.md (float32)"),
    "float64": Policy(16.0, 256.0, 131072.0, "see results/calibration.md (float64): XLA's float64 gradients of "
                      "ill-conditioned entries, amplified by Adam's normalisation, sit 1.3e4 units from the oracle "
                      "where NumPy's own variants agree (mnist_mlp, seed 1, batch 100, step 1)"),
}


def policy(dtype: str) -> Policy:
    try:
        return POLICY[dtype]
    except KeyError:
        raise KeyError(f"no agreement policy for dtype {dtype!r}; known: {', '.join(POLICY)}") from None
