"""``harness selftest``: does the verdict mean anything?  Two measurements, both able to fail:

* **false alarms**: every installed *real* backend (torch, jax, tf1, tf2, keras ..., not copies of the oracle) runs
  clean on many seeds, in both dtypes and at both batch sizes of each model; any row that is not ``pass`` (or an
  honest ``skipped``) is counted;
* **catch rate**: planted-bug copies of the NumPy backend (``harness/mutants.py``) run through the very same runner
  and comparison; each must fail within 10 steps, per dtype and batch size (``n/a`` where a bug cannot exist, e.g.
  an Adam bug in an SGD model).

Many seeds run inside one worker process per backend (``runner.prepare`` with a list of seeds), so each framework's
import and start-up are paid once per model and dtype; rows are judged as they stream in and their arrays dropped.
"""

from __future__ import annotations

import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import backends

from .mutants import BUGS, IDENTICAL_AT
from .runner import CompareConfig, UserError, judge, prepare, run_backend, run_oracle, validate
from .status import Status

CATCH_WITHIN = 10  # a planted bug must be caught at or before this step


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


def _summary(row: dict) -> dict:
    """What a sweep keeps of a judged row (no arrays)."""
    agr = row.get("agreement") or {}
    first = agr.get("first_failure")
    return {"backend": row["backend"], "seed": row.get("seed"), "batch_size": row["batch_size"],
            "status": str(row["status"]), "reason": row.get("reason"),
            "worst_ratio": max((agr.get("worst_ratio") or {}).values(), default=None),
            "worst_ratio_by": agr.get("worst_ratio"),
            "step": first["step"] if first else None, "quantity": first["quantity"] if first else None,
            "tensor": first["tensor"] if first else None, "ratio": first["ratio"] if first else None,
            "optimizer": (((row.get("meta") or {}).get("info") or {}).get("optimizer"))}


def sweep(model: str, backend_names: list[str], seeds: list[int], dtype: str, steps: int = 12,
          batch_sizes: list[int] | None = None, timeout: float = 7200.0,
          progress: Callable[[str], None] = lambda s: None) -> list[dict]:
    """Every backend on every seed and batch size, judged against the oracle and its envelope; one summary each."""
    cfg = CompareConfig(model=model, backends=backend_names, batch_sizes=batch_sizes, steps=steps, dtype=dtype,
                        timing=False, repeat=False, seed=seeds[0], timeout=timeout)
    spec = validate(cfg)
    job = prepare(cfg, spec, seeds)
    options = {"dtype": dtype, "mode": "aligned", "threads": None, "fast": False}
    out: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="dlcompare-sweep-") as tmp:
        work = Path(tmp)
        oracle = run_oracle(job, dtype, steps, cfg.check_every, options, timeout, work, progress)
        for name in backend_names:
            t = time.perf_counter()
            runs = [{"seed": s, "batch_size": b, "device": "cpu", "steps": steps, "check_every": cfg.check_every,
                     "timing": None, "repeat": False} for s in seeds for b in job.batch_sizes]

            def on_row(row: dict) -> dict:
                judge(spec, row, oracle)
                rec = {"model": model, "dtype": dtype, **_summary(row)}
                if rec["status"] not in (Status.PASS, Status.SKIPPED) and not name.startswith("bug-"):
                    progress(f"  {name} seed {rec['seed']} batch {rec['batch_size']}: {rec['status']}: "
                             f"{rec['reason']}")
                return rec

            rows = run_backend(name, job, runs, options, timeout, work, on_row)
            out += rows
            counts: dict[str, int] = {}
            for r in rows:
                counts[r["status"]] = counts.get(r["status"], 0) + 1
            progress(f"  {model} {dtype} {name}: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
                     + f" ({time.perf_counter() - t:.0f} s)")
    return out


def installed_backends() -> list[str]:
    """Every registered backend except the oracle itself whose framework is installed (CUDA-only ones skip)."""
    return [b for b in backends.REGISTRY if b != "numpy" and not backends.missing_requirements(b)]


def run_selftest(models: list[str], dtypes: list[str], seeds: int = 5, steps: int = 12,
                 clean_backends: list[str] | None = None, bug_seeds: int = 2,
                 progress: Callable[[str], None] = lambda s: None) -> dict:
    if steps < 12:
        raise UserError(f"selftest needs at least 12 steps (bugs must show within {CATCH_WITHIN}, and weights are "
                        f"compared after 1, 10 and the last step), got --steps {steps}")
    if seeds < 1 or bug_seeds < 1:
        raise UserError(f"--seeds and --bug-seeds must be at least 1, got {seeds} and {bug_seeds}")
    clean_backends = installed_backends() if clean_backends is None else clean_backends
    started = time.time()
    clean_rows: list[dict] = []
    bug_rows: list[dict] = []
    plugins = {f"bug-{b}": f"harness.mutants:DLCOMPARE_MUTANT={b}" for b in BUGS}
    for model in models:
        for dtype in dtypes:
            progress(f"{model} {dtype}: {len(clean_backends)} backends clean on {seeds} seeds; {len(BUGS)} planted "
                     f"bugs on {bug_seeds} seeds")
            if clean_backends:
                clean_rows += sweep(model, clean_backends, list(range(seeds)), dtype, steps, progress=progress)
            with _plugins(plugins):
                rows = sweep(model, list(plugins), list(range(bug_seeds)), dtype, steps, progress=progress)
            for r in rows:
                r["bug"] = r["backend"][4:]
                if (r["bug"], r["batch_size"]) in IDENTICAL_AT:
                    r["status"], r["reason"] = Status.SKIPPED, IDENTICAL_AT[(r["bug"], r["batch_size"])]
                r["caught"] = None if r["status"] == Status.SKIPPED else (
                    r["status"] == Status.DIVERGED or (r["status"] == Status.FAIL and r["step"] <= CATCH_WITHIN))
            bug_rows += rows
    false_alarms = [r for r in clean_rows if r["status"] in (Status.FAIL, Status.DIVERGED)]
    errors = [r for r in clean_rows if r["status"] not in (Status.PASS, Status.SKIPPED, Status.FAIL, Status.DIVERGED)]
    missed = [r for r in bug_rows if r["caught"] is False]
    return {"kind": "selftest", "models": models, "dtypes": dtypes, "seeds": seeds, "bug_seeds": bug_seeds,
            "steps": steps, "catch_within": CATCH_WITHIN, "backends": clean_backends, "clean": clean_rows,
            "bugs": bug_rows, "false_alarms": false_alarms, "errors": errors, "missed": missed,
            "duration_s": time.time() - started, "ok": not missed and not false_alarms and not errors}


def format_selftest(result: dict, tablefmt: str = "simple") -> str:
    """The summary: false alarms per backend and dtype, catch rate per planted bug, dtype and batch size."""
    from tabulate import tabulate

    lines = []
    clean = result["clean"]
    if clean:
        cells: dict[tuple, list[dict]] = {}
        for r in clean:
            cells.setdefault((r["backend"], r["dtype"]), []).append(r)
        rows = []
        for (b, dt), rs in sorted(cells.items()):
            ran = [r for r in rs if r["status"] != Status.SKIPPED]
            fa = sum(r["status"] in (Status.FAIL, Status.DIVERGED) for r in rs)
            err = sum(r["status"] not in (Status.PASS, Status.SKIPPED, Status.FAIL, Status.DIVERGED) for r in rs)
            worst = max((r["worst_ratio"] for r in ran if r["worst_ratio"] is not None), default=None)
            skipped = sorted({r["reason"] for r in rs if r["status"] == Status.SKIPPED})
            rows.append([b, dt, len(ran), fa, err, "-" if worst is None else f"{worst:.3f}",
                         "; ".join(skipped)[:80] if skipped else ""])
        lines.append(tabulate(rows, headers=["backend", "dtype", "clean rows run", "false alarms", "errors",
                                             "worst error / bound", "skipped"], tablefmt=tablefmt))
        n_fa, n_run = len(result["false_alarms"]), sum(r["status"] != Status.SKIPPED for r in clean)
        lines.append(f"\nfalse alarms: {n_fa} of {n_run} clean rows ({len({r['seed'] for r in clean})} seeds x "
                     f"{', '.join(result['models'])} x {', '.join(result['dtypes'])} x both batch sizes); "
                     f"errors: {len(result['errors'])}")
        for r in result["false_alarms"] + result["errors"]:
            lines.append(f"  {r['status'].upper()} {r['model']} {r['dtype']} {r['backend']} seed {r['seed']} batch "
                         f"{r['batch_size']}: {r['reason']}")
    cells = {}
    for r in result["bugs"]:
        cells.setdefault((r["bug"], r["dtype"], r["batch_size"]), []).append(r)
    table = []
    for bug in BUGS:
        for dt in result["dtypes"]:
            row = [bug, dt]
            for bs_label in ("1", "N"):
                sel = [r for (b, d, bs), rs in cells.items() if b == bug and d == dt and (bs == 1) == (bs_label == "1")
                       for r in rs]
                applicable = [r for r in sel if r["caught"] is not None]
                if not applicable:
                    row.append("n/a")
                    continue
                caught = [r for r in applicable if r["caught"]]
                steps = [r["step"] for r in caught if r["step"] is not None]
                row.append(f"{len(caught)}/{len(applicable)}" + (f" (step {min(steps)}-{max(steps)})" if steps else ""))
            table.append(row)
    lines.append("\n" + tabulate(table, headers=["planted bug", "dtype", "caught at batch 1", "caught at batch N"],
                                 tablefmt=tablefmt))
    applicable = [r for r in result["bugs"] if r["caught"] is not None]
    by_dtype = {dt: [r for r in applicable if r["dtype"] == dt] for dt in result["dtypes"]}
    lines.append("\ncatch rate within {} steps: ".format(result["catch_within"]) + "; ".join(
        f"{dt} {sum(r['caught'] for r in rs)}/{len(rs)}" for dt, rs in by_dtype.items()))
    for r in result["missed"]:
        lines.append(f"  MISSED {r['bug']} {r['model']} {r['dtype']} seed {r['seed']} batch {r['batch_size']}: "
                     f"{r['status']}: {r['reason']}")
    lines.append(f"\nplanted bugs caught: {sum(r['caught'] for r in applicable)}/{len(applicable)}")
    return "\n".join(lines)
