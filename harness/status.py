"""The one status type of a row, used everywhere (worker, runner, agreement, report, CLI, selftest).

The verdict words are chosen so that no two differ by one letter:

* ``pass``: every compared quantity within its bound; ``fail``: a disagreement with the oracle (numbers say where);
* ``error``: the backend crashed, timed out or wrote nothing (a bug in the run, not a disagreement);
* ``skipped``: the backend cannot run this configuration (not installed, no CUDA device, unsupported dtype ...);
* ``diverged``: NaN/Inf in the losses or weights; ``interrupted``: Ctrl-C before the row finished;
* ``ok``: the worker finished a run that has not been judged yet (never shown in a table);
* native mode (the defaults audit) says ``matches spec`` / ``differs`` instead of pass / fail.
"""

from __future__ import annotations

from enum import Enum


class Status(str, Enum):
    OK = "ok"
    PASS = "pass"
    FAIL = "fail"
    ERROR = "error"
    SKIPPED = "skipped"
    DIVERGED = "diverged"
    INTERRUPTED = "interrupted"
    MATCHES = "matches spec"
    DIFFERS = "differs"

    def __str__(self) -> str:  # f"{status}" and json.dumps both give the plain word
        return self.value


# statuses after which the CLI exits 0 (anything else: 1)
GOOD = frozenset({Status.PASS, Status.SKIPPED, Status.MATCHES, Status.DIFFERS})


# status words of older records and workers: "failed" (a crash) and "missing" (no result written) are now ERROR
OLD_STATUS_WORDS = {"failed": Status.ERROR, "missing": Status.ERROR}


def as_status(word) -> Status:
    """A row's status word as the Status type, old words included."""
    return OLD_STATUS_WORDS.get(word) or Status(word)
