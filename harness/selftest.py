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
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import numpy as np

import backends

from . import agreement
from .mutants import BUGS, CAUSE, IDENTICAL_AT
from .rows import Row
from .runner import CompareConfig, UserError, judge, prepare, run_backend, run_oracle, span, validate
from .status import Status

CATCH_WITHIN = agreement.EARLY  # a planted bug must be caught at or before this step


@contextmanager
def _plugins(entries: dict[str, str]):
    old = os.environ.get(backends.PLUGINS_ENV)  # the user's own plugins stay registered beside the planted bugs
    os.environ[backends.PLUGINS_ENV] = ",".join([*filter(None, [old]), *(f"{k}={v}" for k, v in entries.items())])
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(backends.PLUGINS_ENV, None)
        else:
            os.environ[backends.PLUGINS_ENV] = old


@contextmanager
def _jax_cache():
    """JAX's persistent compilation cache for the sweep's subprocesses: every seed builds the same computations, so
    XLA compiles each once per process instead of once per model instance (the same executable: numbers unchanged)."""
    keys = {"JAX_COMPILATION_CACHE_DIR": None, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    old = {k: os.environ.get(k) for k in keys}
    with tempfile.TemporaryDirectory(prefix="dlcompare-jax-cache-") as tmp:
        os.environ.update({k: v or tmp for k, v in keys.items()})
        try:
            yield
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def _summary(row: Row) -> dict:
    """What a sweep keeps of a judged row (no arrays)."""
    agr = row.get("agreement") or {}
    first = agr.get("first_failure")
    return {"backend": row["backend"], "seed": row.get("seed"), "batch_size": row["batch_size"],
            "status": str(row["status"]), "reason": row.get("reason"),
            "worst_ratio": max((agr.get("worst_ratio") or {}).values(), default=None),
            "worst_ratio_by": agr.get("worst_ratio"), "worst_ratio_early": agr.get("worst_ratio_early"),
            "step": first["step"] if first else None, "quantity": first["quantity"] if first else None,
            "tensor": first["tensor"] if first else None, "ratio": first["ratio"] if first else None,
            "optimizer": (((row.get("meta") or {}).get("info") or {}).get("optimizer")),
            "diagnosis": _diagnosis_summary(row.get("diagnosis"))}


def _diagnosis_summary(diagnosis: dict | None) -> dict | None:
    """What a sweep keeps of a row's diagnosis: the causes in order, whether the first explains the row, its line."""
    from .diagnose import summary

    if diagnosis is None:
        return None
    probable = diagnosis.get("probable") or []
    return {"causes": [d["cause"] for d in probable], "explains": bool(probable and probable[0]["explains"]),
            "line": summary(diagnosis), "error": diagnosis.get("error"), "reruns": diagnosis.get("reruns"),
            "seconds": diagnosis.get("seconds")}


def _bug_summary(r: dict) -> dict:
    """A planted bug's summary with its name and whether it was caught within CATCH_WITHIN steps (None: it cannot
    exist in this configuration, a skip that says why)."""
    bug = r["backend"][4:]
    why = IDENTICAL_AT.get((bug, r["batch_size"]))
    if bug == "batch_shift" and r["same_batch_every_step"]:
        why = "every step sees the same batch (full batch, unshuffled): a shifted order is the same"
    status, reason = (Status.SKIPPED, why) if why else (r["status"], r["reason"])
    caught = None if status == Status.SKIPPED else (
        status == Status.DIVERGED or (status == Status.FAIL and r["step"] <= CATCH_WITHIN))
    # named correctly: the diagnosis's first cause is the bug's own (harness.mutants.CAUSE); None where not caught
    causes = (r.get("diagnosis") or {}).get("causes") or []
    named = None if not caught else bool(causes and causes[0] == CAUSE[bug])
    return {**r, "bug": bug, "status": status, "reason": reason, "caught": caught, "named": named,
            "expected_cause": CAUSE[bug]}


def sweep(model: str, backend_names: list[str], seeds: list[int], dtype: str, steps: int = 12,
          batch_sizes: list[int] | None = None, timeout: float = 7200.0, threads: int | None = None,
          progress: Callable[[str], None] = lambda s: None) -> list[dict]:
    """Every backend on every seed and batch size, judged against the oracle and its envelope; one summary each."""
    cfg = CompareConfig(model=model, backends=backend_names, batch_sizes=batch_sizes, steps=steps, dtype=dtype,
                        timing=False, repeat=False, seed=seeds[0], timeout=timeout, threads=threads)
    spec = validate(cfg)
    job = prepare(cfg, spec, seeds)
    # a batch order that repeats one batch (a full-batch, unshuffled data set) makes a shifted order the same order
    same_batch = {(s, b): bool(np.all(job.order(b, s) == job.order(b, s)[:1])) for s in seeds for b in job.batch_sizes}
    options = {"dtype": dtype, "mode": "aligned", "threads": threads, "fast": False}
    out: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="dlcompare-sweep-") as tmp:
        work = Path(tmp)
        t = time.perf_counter()
        oracle = run_oracle(job, dtype, steps, cfg.check_every, options, timeout, work, progress)
        progress(f"  {model} {dtype} oracle and its variants: seeds {span(seeds)} "
                 f"({time.perf_counter() - t:.0f} s)")
        for name in backend_names:
            t = time.perf_counter()
            runs = [{"seed": s, "batch_size": b, "device": "cpu", "steps": steps, "check_every": cfg.check_every,
                     "timing": None, "repeat": False} for s in seeds for b in job.batch_sizes]

            def on_row(row: Row) -> dict:
                row = judge(spec, row, oracle, job)
                rec = {"model": model, "dtype": dtype, **_summary(row),
                       "same_batch_every_step": same_batch[(row.get("seed"), row["batch_size"])]}
                if rec["status"] not in (Status.PASS, Status.SKIPPED) and not rec["backend"].startswith("bug-"):
                    progress(f"  {rec['backend']} seed {rec['seed']} batch {rec['batch_size']}: {rec['status']}: "
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
                 clean_backends: list[str] | None = None, bug_seeds: int = 2, jobs: int = 2,
                 progress: Callable[[str], None] = lambda s: None) -> dict:
    """The sweep over models x dtypes: the clean backends on seeds 0..seeds-1 (in ``jobs`` parallel halves, one
    thread per backend process so that they share the cores fairly) and the planted bugs on 0..bug_seeds-1."""
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
    threads = 1 if jobs > 1 else None
    with _plugins(plugins), _jax_cache(), ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        # every model and dtype is queued at once: a pool thread that finishes its part starts the next one, instead
        # of waiting with an idle core while the other part (often the planted bugs' sweep) runs alone
        tasks = []
        for model in models:
            for dtype in dtypes:
                progress(f"{model} {dtype}: {len(clean_backends)} backends clean on {seeds} seeds; {len(BUGS)} "
                         f"planted bugs on {bug_seeds} seeds (queued)")
                halves = [h for h in (list(range(seeds))[i::max(1, jobs)] for i in range(max(1, jobs))) if h]
                clean = [pool.submit(sweep, model, clean_backends, h, dtype, steps, threads=threads,
                                     progress=progress) for h in halves] if clean_backends else []
                bugs = pool.submit(sweep, model, list(plugins), list(range(bug_seeds)), dtype, steps,
                                   threads=threads, progress=progress)
                tasks.append((clean, bugs))
        try:
            results = [([f.result() for f in clean], bugs.result()) for clean, bugs in tasks]
        except BaseException:  # Ctrl-C or a crash: what is queued never starts; running sweeps finish as before
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        for clean, rows in results:
            for part in clean:
                clean_rows += part
            bug_rows += [_bug_summary(r) for r in rows]
    clean_rows.sort(key=lambda r: (r["model"], r["dtype"], r["backend"], r["seed"], r["batch_size"]))
    false_alarms = [r for r in clean_rows if r["status"] in (Status.FAIL, Status.DIVERGED)]
    errors = [r for r in clean_rows if r["status"] not in (Status.PASS, Status.SKIPPED, Status.FAIL, Status.DIVERGED)]
    missed = [r for r in bug_rows if r["caught"] is False]
    misnamed = [r for r in bug_rows if r.get("named") is False]
    diagnosed_clean = [r for r in clean_rows if r.get("diagnosis") and r["status"] == Status.PASS]
    return {"kind": "selftest", "models": models, "dtypes": dtypes, "seeds": seeds, "bug_seeds": bug_seeds,
            "steps": steps, "catch_within": CATCH_WITHIN, "backends": clean_backends, "clean": clean_rows,
            "bugs": bug_rows, "false_alarms": false_alarms, "errors": errors, "missed": missed, "misnamed": misnamed,
            "duration_s": time.time() - started,
            "ok": not missed and not misnamed and not false_alarms and not errors and not diagnosed_clean}


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
        seeds = {m: len({r["seed"] for r in clean if r["model"] == m}) for m in result["models"]}
        per_model = ", ".join(f"{m} {n} seeds" for m, n in seeds.items())
        lines.append(f"\nfalse alarms: {n_fa} of {n_run} clean rows ({per_model}; {', '.join(result['dtypes'])}; "
                     f"both batch sizes); errors: {len(result['errors'])}; clean rows with a diagnosis: "
                     f"{sum(bool(r.get('diagnosis')) for r in clean if r['status'] == Status.PASS)}")
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
                    row += ["n/a", "-"]
                    continue
                caught = [r for r in applicable if r["caught"]]
                steps = [r["step"] for r in caught if r["step"] is not None]
                row.append(f"{len(caught)}/{len(applicable)}" + (f" (step {min(steps)}-{max(steps)})" if steps else ""))
                named = [r for r in caught if r.get("named")]
                measured = all("named" in r for r in caught)  # a record from before the diagnosis has no names
                row.append((f"{len(named)}/{len(caught)}" if measured else "not measured") if caught else "-")
            table.append(row)
    lines.append("\n" + tabulate(table, headers=["planted bug", "dtype", "caught at batch 1", "named correctly",
                                                 "caught at batch N", "named correctly"], tablefmt=tablefmt))
    applicable = [r for r in result["bugs"] if r["caught"] is not None]
    by_dtype = {dt: [r for r in applicable if r["dtype"] == dt] for dt in result["dtypes"]}
    lines.append("\ncatch rate within {} steps: ".format(result["catch_within"]) + "; ".join(
        f"{dt} {sum(r['caught'] for r in rs)}/{len(rs)}" for dt, rs in by_dtype.items()))
    for r in result["missed"]:
        lines.append(f"  MISSED {r['bug']} {r['model']} {r['dtype']} seed {r['seed']} batch {r['batch_size']}: "
                     f"{r['status']}: {r['reason']}")
    caught_rows = [r for r in applicable if r["caught"]]
    unnamed = {r["model"] for r in caught_rows if "named" not in r}
    lines.append("named correctly (the diagnosis's first cause is the bug's own): " + "; ".join(
        f"{dt} {sum(bool(r.get('named')) for r in rs if r['caught'] and 'named' in r)}/"
        f"{sum(bool(r['caught']) for r in rs if 'named' in r)}" for dt, rs in by_dtype.items())
        + (f" (not measured: {', '.join(sorted(unnamed))}, whose record predates the diagnosis)" if unnamed else ""))
    for r in caught_rows:
        if r.get("named") is False:
            d = r.get("diagnosis") or {}
            lines.append(f"  MISNAMED {r['bug']} {r['model']} {r['dtype']} seed {r['seed']} batch {r['batch_size']}: "
                         f"expected {r['expected_cause']}, diagnosed {d.get('line') or d.get('error') or 'nothing'}")
    lines.append(f"\nplanted bugs caught: {len(caught_rows)}/{len(applicable)}; named correctly: "
                 f"{sum(bool(r.get('named')) for r in caught_rows)}/{sum('named' in r for r in caught_rows)}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ records and files
def _record(result: dict) -> dict:
    import datetime as _dt

    from .results import SCHEMA, git_commit, machine, new_run_id
    from .tolerances import POLICY

    names = sorted({r["backend"] for r in result["clean"]} | {"numpy"})
    return {"schema": SCHEMA, "run_id": new_run_id("selftest"), "kind": "selftest",
            "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(), "commit": git_commit(),
            "machine": machine(), "versions": {b: backends.version(b) for b in names if b in backends.REGISTRY},
            "policy": {dt: {"early_multiple": p.early_multiple, "late_multiple": p.late_multiple,
                            "floor_ulps": p.floor_ulps} for dt, p in POLICY.items()},
            **{k: v for k, v in result.items() if k not in ("false_alarms", "errors", "missed", "misnamed")}}


def merge_sweeps(records: list[dict], calibration: bool = False) -> dict | None:
    """One summary record from the newest sweep record of each model (oldest first in ``records``); with
    ``calibration`` only calibration records count.  Long sweeps can so run model by model."""
    from models import MODELS

    sweeps = [r for r in records if r.get("kind") == "selftest" and (r.get("calibration") or not calibration)]
    newest: dict[str, dict] = {}
    for rec in sweeps:
        for m in rec["models"]:
            newest[m] = rec
    if not newest:
        return None
    models = [m for m in MODELS if m in newest] + [m for m in newest if m not in MODELS]
    runs = list({id(r): r for r in (newest[m] for m in models)}.values())
    last = runs[-1]
    return {**last, "models": models, "runs": [{"run_id": r["run_id"], "commit": r["commit"], "models": [
                m for m in models if newest[m] is r], "seeds": r["seeds"], "bug_seeds": r["bug_seeds"],
                "duration_s": r["duration_s"], "backends": r["backends"]} for r in runs],
            "dtypes": sorted({d for r in runs for d in r["dtypes"]}),
            "clean": [x for m in models for x in newest[m]["clean"] if x["model"] == m],
            "bugs": [x for m in models for x in newest[m]["bugs"] if x["model"] == m],
            "seeds": min(r["seeds"] for r in runs), "duration_s": sum(r["duration_s"] for r in runs)}


def _header(rec: dict, title: str) -> list[str]:
    from tabulate import tabulate

    from .report import GENERATED

    versions = ", ".join(f"{k} {v}" for k, v in rec["versions"].items() if v)
    runs = rec.get("runs") or [{"run_id": rec["run_id"], "commit": rec["commit"], "models": rec["models"],
                                "seeds": rec["seeds"], "bug_seeds": rec["bug_seeds"], "duration_s": rec["duration_s"],
                                "backends": rec["backends"]}]
    table = tabulate([[f"`{r['run_id']}`", r["commit"], ", ".join(r["models"]), f"0..{r['seeds'] - 1}",
                       f"0..{r['bug_seeds'] - 1}", f"{r['duration_s'] / 60:.0f} min"] for r in runs],
                     headers=["run (results/raw/)", "commit", "models", "clean seeds", "bug seeds", "took"],
                     tablefmt="github")
    return [GENERATED, f"# {title}", "",
            f"{rec['machine']['cpu']} ({rec['machine']['cores']} cores), {versions}. Every clean run: each model in "
            f"{', '.join(rec['dtypes'])} at both of its batch sizes, {rec['steps']} steps, every installed backend "
            f"({', '.join(rec['backends']) or 'none'}). A planted bug counts as caught when its row fails by step "
            f"{rec['catch_within']}, and as named correctly when the diagnosis (`harness/diagnose.py`) gives its own "
            f"cause (`harness.mutants.CAUSE`) first.", "", table, ""]


def selftest_markdown(rec: dict) -> str:
    result = {**rec, "false_alarms": [r for r in rec["clean"] if r["status"] in (Status.FAIL, Status.DIVERGED)],
              "errors": [r for r in rec["clean"] if r["status"] not in (Status.PASS, Status.SKIPPED, Status.FAIL,
                                                                       Status.DIVERGED)],
              "missed": [r for r in rec["bugs"] if r["caught"] is False]}
    return "\n".join(_header(rec, "Self-test: false alarms of real backends, catch rate and naming of planted bugs")
                     + [format_selftest(result, tablefmt="github"), ""])


def calibration_rows(rec: dict) -> list[list]:
    """Per model and dtype: the largest clean error and the smallest planted-bug error, both in units of the bound."""
    out = []
    for model in rec["models"]:
        for dt in rec["dtypes"]:
            clean = [r for r in rec["clean"] if r["model"] == model and r["dtype"] == dt
                     and r["worst_ratio"] is not None]
            bugs = [r for r in rec["bugs"] if r["model"] == model and r["dtype"] == dt and r["caught"] is not None]
            noisy = max(clean, key=lambda r: r["worst_ratio"], default=None)
            # a bug's evidence: its largest error over the first steps (a diverged row has no number: it is caught)
            sized = [r for r in bugs if r["status"] != Status.DIVERGED and r.get("worst_ratio_early") is not None]
            faint = min(sized, key=lambda r: r["worst_ratio_early"], default=None)
            noise = noisy["worst_ratio"] if noisy else None
            gap = faint["worst_ratio_early"] if faint else None
            out.append([model, dt, len(clean),
                        "-" if noisy is None else f"{noise:.3g} ({noisy['backend']}, seed {noisy['seed']}, batch "
                                                  f"{noisy['batch_size']})",
                        "-" if faint is None else f"{gap:.3g} ({faint['bug']}, batch {faint['batch_size']})",
                        "-" if not (noise and gap) else f"{gap / noise:.3g}"])
    return out


def calibration_markdown(rec: dict) -> str:
    pol = rec["policy"]
    lines = _header(rec, "Calibration: noise of correct backends and the smallest planted bug, in units of the bound")
    lines += ["A check passes when its error, in rounding units of each element (`|a - b| / (eps(dtype) * "
              "max(|b|, floor))`, the floor a fraction of the whole set's scale), is at most `multiple * envelope + "
              "floor_ulps` (`harness/agreement.py`): the envelope is the largest such distance of the oracle's "
              "rounding variants, run in the compared dtype in the same run, to the float64 oracle at that check. "
              "Policy in force (`harness/tolerances.py`): "
              + "; ".join(f"{dt}: multiple {p['early_multiple']:g} at steps 0-1 and {p['late_multiple']:g} after, "
                          f"floor {p['floor_ulps']:g} units" for dt, p in pol.items())
              + ".", "",
              "Below, **noise** is the largest error / bound of any check of any clean row of a real backend (must be "
              "< 1: no false alarm), **bug** the smallest, over planted bugs that can exist in that model, of the "
              "largest error / bound within the first "
              f"{rec['catch_within']} steps (must be > 1: caught); the margin is their ratio.", ""]
    from tabulate import tabulate

    lines.append(tabulate(calibration_rows(rec), headers=["model", "dtype", "clean rows", "noise: worst error / bound",
                                                          "bug: smallest error / bound", "bug / noise"],
                          tablefmt="github"))
    lines.append("")
    return "\n".join(lines)


def save_selftest(result: dict, results_dir: Path, calibration: bool = False) -> list[Path]:
    """The raw record under results/raw/ (never overwritten) and the summaries regenerated from every sweep there."""
    import json

    from .results import _exclusive_replace, _json_default, check_writable, load_records

    raw = check_writable(results_dir)
    rec = {**_record(result), "calibration": calibration}
    path = raw / f"{rec['run_id']}.json"
    tmp = raw / f".{rec['run_id']}.json.tmp"
    tmp.write_text(json.dumps(rec, indent=None, default=_json_default))
    _exclusive_replace(tmp, path)
    return [path, *write_summaries(load_records(results_dir), results_dir)]


def write_summaries(records: list[dict], results_dir: Path) -> list[Path]:
    """results/selftest.md from the newest sweep of each model, results/calibration.md from the newest calibration
    sweep of each model."""
    written = []
    for name, make, calibration in (("selftest.md", selftest_markdown, False),
                                    ("calibration.md", calibration_markdown, True)):
        rec = merge_sweeps(records, calibration)
        if rec is None:
            continue
        out = Path(results_dir) / name
        tmp = out.with_suffix(".md.tmp")
        tmp.write_text(make(rec))
        tmp.replace(out)
        written.append(out)
    return written
