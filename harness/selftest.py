"""``harness selftest``: proves the agreement engine catches real bugs and raises no false alarm.

Planted-bug copies of the NumPy backend (``harness/mutants.py``) run through the very same subprocess runner and
comparison as any backend; each must be caught (the report names the step and tensor where it shows), and the clean
copy must pass on several seeds.  Optionally the installed backends run clean on the same seeds too.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Callable

import backends

from .mutants import BUGS
from .runner import CompareConfig, UserError, compare


@contextmanager
def _plugins(entries: dict[str, str]):
    old = os.environ.get(backends.PLUGINS_ENV)
    os.environ[backends.PLUGINS_ENV] = ",".join(f"{k}={v}" for k, v in entries.items())
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(backends.PLUGINS_ENV, None)
        else:
            os.environ[backends.PLUGINS_ENV] = old


def run_selftest(model: str = "mnist_mlp", seeds: int = 5, steps: int = 12, batch_size: int = 100,
                 dtype: str = "float64", clean_backends: list[str] | None = None,
                 progress: Callable[[str], None] = lambda s: None) -> dict:
    if steps < 10:
        raise UserError(f"selftest needs at least 10 steps (optimizer-state bugs show only after a few updates), "
                        f"got --steps {steps}")
    names = {f"bug-{b}": f"harness.mutants:DLCOMPARE_MUTANT={b}" for b in [*BUGS, "none"]}
    bug_rows = []
    with _plugins(names):
        progress(f"planting {len(BUGS)} bugs into copies of the numpy backend ({model}, {dtype}, batch {batch_size})")
        res = compare(CompareConfig(model=model, backends=[f"bug-{b}" for b in BUGS], batch_sizes=[batch_size],
                                    steps=steps, dtype=dtype, timing=False), progress=progress)
        for row in res["rows"]:
            bug = row["backend"][4:]
            first = (row.get("agreement") or {}).get("first_failure")
            caught = row["status"] in ("fail", "diverged")
            bug_rows.append({"bug": bug, "what": BUGS[bug], "caught": caught, "status": row["status"],
                             "step": first["step"] if first else None,
                             "quantity": first["quantity"] if first else None,
                             "tensor": first["tensor"] if first else None,
                             "error": first["error"] if first else None,
                             "reason": row.get("reason")})
        clean = ["bug-none", *(clean_backends or [])]
        clean_rows = []
        for seed in range(seeds):
            progress(f"clean runs, seed {seed}: {', '.join(clean)}")
            r = compare(CompareConfig(model=model, backends=clean, batch_sizes=[1, batch_size], steps=steps,
                                      dtype=dtype, timing=False, seed=seed), progress=progress)
            clean_rows += [{"seed": seed, "backend": row["backend"], "batch_size": row["batch_size"],
                            "status": row["status"], "reason": row.get("reason")} for row in r["rows"]]
    false_alarms = [r for r in clean_rows if r["status"] not in ("pass", "skipped")]
    missed = [r for r in bug_rows if not r["caught"]]
    return {"model": model, "dtype": dtype, "bugs": bug_rows, "clean": clean_rows, "false_alarms": false_alarms,
            "missed": missed, "ok": not missed and not false_alarms}


def _where(r: dict) -> str:
    if r["quantity"] is None:
        return "-"
    return r["quantity"] if r["tensor"] == r["quantity"] else f"{r['quantity']} {r['tensor']}"


def format_selftest(result: dict) -> str:
    from tabulate import tabulate

    rows = [[r["bug"], r["what"], "yes" if r["caught"] else f"NO ({r['status']}: {r['reason']})",
             "-" if r["step"] is None else r["step"], _where(r),
             "-" if r["error"] is None else f"{r['error']:.1e}"] for r in result["bugs"]]
    n_clean = len(result["clean"])
    text = tabulate(rows, headers=["bug", "what", "caught", "at step", "tensor", "scaled error"])
    text += (f"\n\nclean runs: {n_clean} rows over {len({r['seed'] for r in result['clean']})} seeds, "
             f"false alarms: {len(result['false_alarms'])}")
    for r in result["false_alarms"]:
        text += f"\n  FALSE ALARM seed {r['seed']} {r['backend']} batch {r['batch_size']}: {r['status']}: {r['reason']}"
    caught = sum(r["caught"] for r in result["bugs"])
    text += f"\nplanted bugs caught: {caught}/{len(result['bugs'])}"
    return text
