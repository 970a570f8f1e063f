"""Raw results: one JSON + one NPZ per run under ``results/raw/``, written atomically and never overwritten.

The JSON holds everything but tensors (versions, device, flags, commit, seed, data source, timings, per-step losses,
status and agreement per row); the NPZ holds the initial weights, the batch order, the per-step losses and the final
weights of every row, so that anyone can replay the run with their own code.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import platform
import secrets
import subprocess
from pathlib import Path

import numpy as np

import backends
from models.spec import spec_to_dict

from .runner import PROJECT_ROOT
from .status import OLD_STATUS_WORDS

DEFAULT_RESULTS_DIR = PROJECT_ROOT / "results"
SCHEMA = 1


def check_writable(results_dir: Path) -> Path:
    """Fail before any work starts if results cannot be written there."""
    raw = Path(results_dir) / "raw"
    try:
        raw.mkdir(parents=True, exist_ok=True)
        probe = raw / f".write-test-{os.getpid()}-{secrets.token_hex(3)}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise PermissionError(f"cannot write results to {raw} ({e.strerror or e}); pass a writable --results-dir") from e
    return raw


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=PROJECT_ROOT, capture_output=True,
                             text=True, timeout=5)
        if out.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=PROJECT_ROOT,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}


def row_key(row: dict) -> str:
    fast = "|fast" if row.get("fast") else ""  # a fast-mode row is its own row, never merged with the plain one
    return f"{row['backend']}{fast}|{row['dtype']}|{row['mode']}|{row['device']}|b{row['batch_size']}"


def new_run_id(model: str) -> str:
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"{stamp}-{model}-{secrets.token_hex(3)}"


def _exclusive_replace(tmp: Path, final: Path) -> None:
    """Move ``tmp`` to ``final`` atomically, refusing to overwrite an existing file."""
    os.link(tmp, final)  # fails with FileExistsError instead of overwriting
    tmp.unlink()


def to_record(result: dict, run_id: str) -> dict:
    cfg = result["config"]
    spec = result["spec"]
    rows = []
    for row in result["rows"]:
        r = row.to_dict()
        if "arrays" in row and "losses" in row["arrays"]:
            r["losses"] = [float(v) for v in row["arrays"]["losses"]]
        r["key"] = row_key(row)
        r["steps"] = cfg["steps"]
        rows.append(r)
    oracle = {str(b): {"status": r["status"], "reason": r.get("reason"),
                       "losses": [float(v) for v in r.get("arrays", {}).get("losses", [])]}
              for b, r in result["oracle"].items()}
    return {
        "schema": SCHEMA,
        "run_id": run_id,
        "model": spec.name,
        "kind": "compare",
        "created_utc": _dt.datetime.fromtimestamp(result["started"], _dt.timezone.utc).isoformat(),
        "duration_s": result["finished"] - result["started"],
        "interrupted": result["interrupted"],
        "commit": git_commit(),
        "machine": machine(),  # where the driver ran; each row's "node" says where that row was computed
        "executor": result.get("executor", "local"),
        "env": os.environ.get("DLCOMPARE_ENV_NAME"),  # the tox env that produced this run, if any
        "versions": {b: backends.version(b) for b in sorted({r["backend"] for r in result["rows"]} | {"numpy"})},
        "flags": {k: os.environ.get(k) for k in ("TF_ENABLE_ONEDNN_OPTS", "TF_DETERMINISTIC_OPS", "OMP_NUM_THREADS")},
        "config": cfg,
        "seed": cfg["seed"],
        "dtype": spec.dtype,
        "data_source": result["job"].dataset_source,
        "batch_sizes": result["job"].batch_sizes,
        "spec": spec_to_dict(spec),
        "oracle": oracle,
        "rows": rows,
        "pairs": result.get("pairs", []),
    }


def write_run(result: dict, results_dir: Path = DEFAULT_RESULTS_DIR) -> tuple[Path, Path]:
    """Write ``<run_id>.json`` and ``<run_id>.npz`` under ``results_dir/raw``; returns their paths."""
    raw = check_writable(results_dir)
    spec = result["spec"]
    job = result["job"]
    arrays: dict[str, np.ndarray] = {}
    for j, w in enumerate(job.weights):
        arrays[f"init/{spec.param_names()[j]}"] = w
    for b in job.batch_sizes:
        arrays[f"batch_order/{b}"] = job.order(b)
    for b, r in result["oracle"].items():
        _row_arrays(arrays, f"oracle|b{b}", r, spec)
    for row in result["rows"]:
        _row_arrays(arrays, row_key(row), row, spec)
    while True:
        run_id = new_run_id(spec.name)
        json_path, npz_path = raw / f"{run_id}.json", raw / f"{run_id}.npz"
        if not json_path.exists() and not npz_path.exists():
            break
    record = to_record(result, run_id)
    tmp_npz = raw / f".{run_id}.npz.tmp"
    with open(tmp_npz, "wb") as f:
        np.savez_compressed(f, **arrays)
    _exclusive_replace(tmp_npz, npz_path)
    tmp_json = raw / f".{run_id}.json.tmp"
    tmp_json.write_text(json.dumps(record, indent=1, default=_json_default))
    _exclusive_replace(tmp_json, json_path)
    return json_path, npz_path


def _row_arrays(arrays: dict, key: str, row: dict, spec) -> None:
    a = row.get("arrays") or {}
    if "losses" in a:
        arrays[f"{key}/losses"] = a["losses"]
    weights = [k for k in a if k.startswith("weights/")]
    if weights:
        last = max(int(k.split("/")[1]) for k in weights)
        for j, name in enumerate(spec.param_names()):
            if f"weights/{last}/{j}" in a:  # in the row's own dtype: a float32 run's weights are float32 values
                arrays[f"{key}/final/{name}"] = a[f"weights/{last}/{j}"].astype(row.get("dtype", "float64"))
        for j, name in enumerate(spec.state_names()):
            if f"state/{last}/{j}" in a:
                arrays[f"{key}/final/{name}"] = a[f"state/{last}/{j}"].astype(row.get("dtype", "float64"))
    if "pred_final" in a:
        arrays[f"{key}/pred_final"] = a["pred_final"]


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if dataclasses.is_dataclass(o):
        return dataclasses.asdict(o)
    return str(o)


def load_records(results_dir: Path = DEFAULT_RESULTS_DIR) -> list[dict]:
    """All readable raw JSON records, oldest first; unreadable files are reported, not fatal."""
    raw = Path(results_dir) / "raw"
    records = []
    for p in sorted(raw.glob("*.json")):
        try:
            rec = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as e:
            print(f"warning: skipping unreadable result {p.name}: {e}")
            continue
        if rec.get("schema") == SCHEMA:
            rec["_path"] = str(p)
            records.append(_upgrade_statuses(rec))
    records.sort(key=lambda r: r.get("created_utc", ""))
    return records


def _upgrade_statuses(rec: dict) -> dict:
    """Old records say "failed" (a crash) or "missing" (no result written) where new ones say "error"."""
    for row in [*rec.get("rows", []), *(rec.get("oracle") or {}).values()]:
        if row.get("status") in OLD_STATUS_WORDS:
            row["status"] = OLD_STATUS_WORDS[row["status"]]
    return rec


# -------------------------------------------------------------------------------------------- results as a frame
def _plus(a: float | None, b: float | None) -> float | None:
    """Build + first step: the one-off cost before the steady state (None where either is unknown)."""
    return None if a is None or b is None else a + b


def _max(d: dict, pred) -> float | None:
    vals = [v for k, v in d.items() if pred(k) and v is not None]
    return max(vals) if vals else None


def row_fields(row: dict, rec: dict | None = None) -> dict:
    """One measured row of a ``compare`` record as flat columns (the record's fields first, then the row's)."""
    from .executors import node_label

    rec = rec or {}
    meta = row.get("meta") or {}
    t = meta.get("timing") or {}
    agr = row.get("agreement") or {}
    worst = agr.get("worst") or {}
    ratio = agr.get("worst_ratio") or {}
    seg = meta.get("segments") or []
    first = seg[0][1] if seg and seg[0][0] == 1 else None
    build = meta.get("build_s")
    det = meta.get("determinism")
    machine_ = rec.get("machine") or {}
    diffs = list(row.get("native_differences") or [])
    if row.get("not_comparable"):
        diffs.append(f"not comparable: {row['not_comparable']}")
    return {
        "run_id": row.get("run_id") or rec.get("run_id"), "created_utc": rec.get("created_utc"),
        "kind": rec.get("kind", "compare"), "model": rec.get("model"), "env": row.get("env_name", rec.get("env")),
        "commit": rec.get("commit"), "cpu": machine_.get("cpu"), "cores": machine_.get("cores"),
        "executor": rec.get("executor", "local"), "node": node_label(row.get("node")),
        "version": (rec.get("versions") or {}).get(row["backend"]),
        "backend": row["backend"], "fast": bool(row.get("fast")), "dtype": row["dtype"], "mode": row["mode"],
        "device": row["device"], "batch": row["batch_size"], "seed": row.get("seed", rec.get("seed")),
        "steps": row.get("steps", (rec.get("config") or {}).get("steps")),
        "status": str(row["status"]), "reason": row.get("reason"),
        "error_over_bound": max(ratio.values()) if ratio else None,  # the table's "error / bound"
        "loss_err": worst.get("loss"), "grad_err": worst.get("grads"), "weight_err": worst.get("weights"),
        "state_err": worst.get("state"), "pred_err": worst.get("pred"),
        "invariance_err": _max(worst, lambda k: k.startswith("invariance")),
        "repeat": None if not det else ("bit-identical" if det["bit_identical"] else
                                        f"differs ({max(det['max_loss_diff'], det['max_weight_diff']):.1e})"),
        "optimizer": (((meta.get("info") or {}).get("optimizer")) or None),
        "native_differences": "; ".join(diffs) if diffs else None,
        "build_s": build, "first_step_s": first,
        "build_compile_s": _plus(build, first),
        "median_s": t.get("median_s"), "iqr_s": t.get("iqr_s"), "samples_per_s": t.get("samples_per_s"),
        "epoch_s": t.get("epoch_s"), "warmup_s": t.get("warmup_s"), "peak_rss_mb": t.get("peak_rss_mb"),
        "gpu_peak_mb": t.get("gpu_peak_mb"), "cores_busy": t.get("cores_busy"),
    }


def sweep_fields(row: dict, rec: dict) -> dict:
    """One point of a ``sweep`` record as the same flat columns (plus width, FLOPs and the fraction of the limit)."""
    t = row.get("timing") or {}
    peak = (rec.get("peak") or {}).get("gflops")
    machine_ = rec.get("machine") or {}
    build, first = row.get("build_s"), row.get("first_step_s")
    return {
        "run_id": rec.get("run_id"), "created_utc": rec.get("created_utc"), "kind": "sweep", "model": rec.get("model"),
        "env": None, "commit": rec.get("commit"), "cpu": machine_.get("cpu"), "cores": machine_.get("cores"),
        "executor": "local", "node": "-", "version": (rec.get("versions") or {}).get(row["backend"]),
        "backend": row["backend"], "fast": bool((rec.get("config") or {}).get("fast")), "dtype": rec.get("dtype"),
        "mode": "aligned", "device": rec.get("device"), "batch": row["batch"], "seed": (rec.get("config") or {}).get("seed"),
        "status": row["status"], "reason": row.get("reason"), "sweep": row["sweep"], "width": row.get("width"),
        "flops": row["flops"], "build_s": build, "first_step_s": first,
        "build_compile_s": _plus(build, first),
        "median_s": t.get("median_s"), "iqr_s": t.get("iqr_s"), "samples_per_s": t.get("samples_per_s"),
        "warmup_s": t.get("warmup_s"), "peak_rss_mb": t.get("peak_rss_mb"), "gpu_peak_mb": t.get("gpu_peak_mb"),
        "cores_busy": t.get("cores_busy"), "gflops": row["flops"] / t["median_s"] / 1e9 if t.get("median_s") else None,
        "fraction_of_limit": row["flops"] / t["median_s"] / 1e9 / peak if t.get("median_s") and peak else None,
    }


def frame(rows: list[dict]):
    """A pandas DataFrame of flat rows (``row_fields`` / ``sweep_fields``), missing values as None/NaN."""
    import pandas as pd

    return pd.DataFrame(rows)


def load_runs(results_dir: Path = DEFAULT_RESULTS_DIR, kinds: tuple[str, ...] = ("compare", "sweep")):
    """Every measured row of every raw record under ``results_dir/raw`` as one pandas DataFrame, oldest run first:
    one row per backend x dtype x mode x device x batch size of a ``compare`` run (and per point of a ``sweep``),
    with the run (``run_id``, ``created_utc``, ``env``, ``commit``, ``cpu``, ``cores``, ``node``, the backend's
    ``version``), the configuration, ``status`` and ``reason``, the agreement (``error_over_bound``, ``*_err``) and
    the timings (``build_compile_s``, ``first_step_s``, ``median_s``, ``iqr_s``, ``samples_per_s``, ...).
    Self-test and hazards records (whose rows are of another kind) are left out."""
    out = []
    for rec in load_records(results_dir):
        kind = rec.get("kind", "compare")
        if kind not in kinds:
            continue
        if kind == "compare":
            out += [row_fields(r, rec) for r in rec.get("rows", [])]
        elif kind == "sweep":
            out += [sweep_fields(r, rec) for r in rec.get("rows", [])]
    return frame(out)
