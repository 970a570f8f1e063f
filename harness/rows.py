"""A row: one backend's result on one run (backend, dtype, mode, device, batch size, seed), as a typed record.

A row is created once from what its worker wrote (``runner._collect_one``) or from why it has no result (skipped,
error, interrupted), and judging it makes a new row (``runner.judge``); nothing patches a row in place.  Its status is
the one :class:`harness.status.Status` type.  Rows read like the rows of a raw JSON record (``row["status"]``,
``row.get("reason")``, ``"agreement" in row``), so the report and the tests read both alike; ``to_dict`` is the JSON
form (without the arrays, which go to the NPZ).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

from .status import Status, as_status


@dataclass(frozen=True)
class Row:
    backend: str
    dtype: str
    mode: str
    batch_size: int
    device: str
    status: Status
    seed: int | None = None
    fast: bool = False
    reason: str | None = None
    variant: str | None = None  # the oracle's rounding variant, for its own rows
    version: str | None = None  # the framework's version, as the worker imported it
    env: dict | None = None  # the worker's environment flags
    meta: dict | None = None  # what the worker measured besides arrays: timings, info, determinism, ...
    arrays: dict | None = field(default=None, repr=False, compare=False)  # losses, grads, weights, state, preds
    agreement: dict | None = None  # the verdict's summary (agreement.summarize)
    checks: tuple = ()  # the failing checks, as dicts
    native_differences: tuple | None = None  # the defaults audit: what the framework's defaults change
    not_comparable: str | None = None  # what a native row cannot compare, and why
    diagnosis: dict | None = None  # a failing row's probable causes (harness/diagnose.py); never changes the status
    node: dict | None = None  # the machine that computed it (harness.executors.node_info): timings compare within one

    def __post_init__(self) -> None:
        object.__setattr__(self, "status", as_status(self.status))

    # read access by key, like a row of a raw JSON record; a field that is unset reads as absent
    def __getitem__(self, key: str):
        if key not in _NAMES or getattr(self, key) is None:
            raise KeyError(key)
        return getattr(self, key)

    def get(self, key: str, default=None):
        value = getattr(self, key) if key in _NAMES else None
        return default if value is None else value

    def __contains__(self, key: str) -> bool:
        return key in _NAMES and getattr(self, key) is not None

    def but(self, **changes) -> "Row":
        """A new row with ``changes`` (the row itself is never modified)."""
        return replace(self, **changes)

    def to_dict(self) -> dict:
        """The JSON form: every set field but the arrays, the status as its word."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "arrays" or value is None:
                continue
            out[f.name] = str(value) if f.name == "status" else (list(value) if isinstance(value, tuple) else value)
        return out


_NAMES = frozenset(f.name for f in fields(Row))
