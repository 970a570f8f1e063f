"""Does `--executor ray` cost wall time? `harness matrix --no-timing` over the four models, local vs ray, alternated.

    python benchmarks/matrix_executors.py                       # the four models, every installed backend, 2 rounds
    python benchmarks/matrix_executors.py --models mlp_431 --rounds 3

Each round runs the same command twice, once per executor (local first on even rounds, ray first on odd ones, so a
drift of the machine's load falls on both alike), each in a fresh process and a fresh results directory, and times
the whole command: Python start-up, a Ray instance started for the run and stopped after it (`--executor ray` with no
address, as a user on one machine runs it), every group's oracle and cells, the raw records written. The ratio of a
round is ray wall / local wall; the verdict takes the median over rounds. Both executors must produce the same rows
with the same statuses (checked here: a faster executor that loses or changes rows would not count).

Writes benchmarks/matrix-executors.json (every measurement) and benchmarks/matrix-executors.md (the table, machine,
versions). Exit 1 when the median ratio exceeds --limit (default 1.15: ray at most 15% slower) or the rows differ.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from harness.results import git_commit, machine  # noqa: E402

MODELS = "mlp_431,pima_mlp,mnist_mlp,mnist_cnn"


def rows_of(results_dir: Path) -> dict[str, str]:
    """row key with its model and seed -> status, over every raw record of one run."""
    out = {}
    for p in sorted((results_dir / "raw").glob("*.json")):
        rec = json.loads(p.read_text())
        for r in rec["rows"]:
            out[f"{rec['model']}|seed{rec['config']['seed']}|{r['key']}"] = r["status"]
    return out


def run_once(executor: str, args) -> dict:
    with tempfile.TemporaryDirectory(prefix="dlc-bench-") as tmp:
        cmd = [sys.executable, "-m", "harness", "matrix", "--models", args.models, "--no-timing", "--executor",
               executor, "--results-dir", str(Path(tmp) / "results")] + (["--backends", args.backends]
                                                                         if args.backends else [])
        env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
        env.pop("RAY_ADDRESS", None)  # a local Ray instance, started and stopped by the command
        t = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t
        rows = rows_of(Path(tmp) / "results")
    if proc.returncode not in (0, 1):
        raise SystemExit(f"{executor}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
    counts: dict[str, int] = {}
    for st in rows.values():
        counts[st] = counts.get(st, 0) + 1
    print(f"  {executor}: {wall:.1f} s, {len(rows)} rows ({counts})", flush=True)
    return {"executor": executor, "wall_s": wall, "exit_code": proc.returncode, "rows": rows, "counts": counts}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=MODELS)
    p.add_argument("--backends", help="comma-separated (default: every registered backend)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--limit", type=float, default=1.15, help="the highest acceptable median ray / local ratio")
    p.add_argument("--out", default=str(HERE / "matrix-executors"), help="output path without extension")
    args = p.parse_args(argv)

    commit = git_commit()  # of the code measured (read before the runs: an edit during them does not change it)
    runs = []
    for i in range(args.rounds):
        order = ("local", "ray") if i % 2 == 0 else ("ray", "local")
        print(f"round {i + 1}/{args.rounds}: {' then '.join(order)}", flush=True)
        got = {ex: run_once(ex, args) for ex in order}
        runs.append({"round": i, "order": list(order), **{ex: {k: v for k, v in r.items() if k != "rows"}
                                                            for ex, r in got.items()},
                     "ratio": got["ray"]["wall_s"] / got["local"]["wall_s"],
                     "same_rows": got["ray"]["rows"] == got["local"]["rows"],
                     "differences": sorted(k for k in set(got["ray"]["rows"]) | set(got["local"]["rows"])
                                           if got["ray"]["rows"].get(k) != got["local"]["rows"].get(k))[:20]})
    ratios = [r["ratio"] for r in runs]
    median = statistics.median(ratios)
    same = all(r["same_rows"] for r in runs)
    versions = {}
    for dist in ("ray", "numpy", "torch", "tensorflow-cpu", "jax", "keras"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    m = machine()
    result = {"what": "harness matrix --no-timing, local vs ray (a local Ray instance per command)",
              "models": args.models, "backends": args.backends or "all registered", "rounds": args.rounds,
              "machine": {"cpu": m["cpu"], "cores": m["cores"]}, "python": sys.version.split()[0],
              "versions": versions, "commit": commit, "limit": args.limit, "median_ratio": median,
              "same_rows": same, "runs": runs, "verdict": "ok" if median <= args.limit and same else "too slow"
              if same else "rows differ"}
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    lines = ["<!-- generated by benchmarks/matrix_executors.py from matrix-executors.json: do not edit -->",
             "# `harness matrix --no-timing`: local vs Ray on one machine", "",
             f"Models {args.models}, backends: {result['backends']}; {m['cpu']} ({m['cores']} cores), Python "
             f"{result['python']}, " + ", ".join(f"{k} {v}" for k, v in versions.items() if v)
             + f"; commit {result['commit']}.", "",
             "Wall time of the whole command, each executor in a fresh process and results directory, alternated "
             "(ray: a Ray instance started for the command and stopped after it, its start-up included).", "",
             "| round | order | local s | ray s | ray / local | rows | same rows and statuses |",
             "|---|---|---|---|---|---|---|"]
    for r in runs:
        counts = r["local"]["counts"]
        lines.append(f"| {r['round'] + 1} | {' then '.join(r['order'])} | {r['local']['wall_s']:.1f} | "
                     f"{r['ray']['wall_s']:.1f} | {r['ratio']:.3f} | "
                     f"{sum(counts.values())} ({', '.join(f'{n} {s}' for s, n in sorted(counts.items()))}) | "
                     f"{'yes' if r['same_rows'] else 'NO: ' + ', '.join(r['differences'])} |")
    lines += ["", f"Median ray / local: **{median:.3f}** (limit {args.limit}): **{result['verdict']}**.", ""]
    out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines[-2:]))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")
    return 0 if result["verdict"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
