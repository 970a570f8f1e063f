"""Overhead honesty: is the per-step time the harness reports for a backend within 10% of a plain loop in that
framework doing the same work?

    python benchmarks/overhead.py                                # mnist_mlp, every installed backend, batch 1 and 100
    python benchmarks/overhead.py --model mnist_cnn --backends torch,jax --repeats 5 --diagnose
    python benchmarks/overhead.py --mode paired --paired-rounds 60      # only the in-process paired measurement

Two measurements, both on the same batches and initial weights (the harness's own: its MNIST data, its batch order,
its canonical initial weights, written to an .npz that each plain loop reads with ``--data``):

``alternate`` -- the harness as a user runs it.  For each backend and each repeat, alternately (plain first on even
turns, harness first on odd ones, so that a drift of the machine's load falls on both sides alike):

* the plain loop ``benchmarks/plain/<framework>_loop.py`` in a subprocess of its own, once per batch size, with the
  environment the harness gives that backend's worker (``harness.runner.subprocess_env``: ``KERAS_BACKEND``, the
  thread variables, ``JAX_ENABLE_X64`` for float64), one untimed round first (the harness times a model that has run
  its correctness steps already);
* the harness: ``harness.runner.compare(CompareConfig(model, backends=[b], batch_sizes=..., steps=S, timing=True,
  timing_rounds=R, timing_steps=S, threads=...))``, whose rows carry ``meta.timing.median_s``.

Both sides time ``S`` in-memory batches per round, one warm-up round apart, ``R`` rounds, median per step.  The ratio of
a repeat is harness / plain; the table gives the median ratio over the repeats and its range.  ``--diagnose`` also runs
each plain loop with ``--feed numpy`` (NumPy batches converted inside the timed step, as the harness feeds a backend),
which tells how much of a gap is that conversion.

``paired`` -- the same two code paths in ONE process (``benchmarks/_paired.py``): the backend's ``Model`` (what
``compare`` builds in its worker) and the plain loop, their rounds alternated one by one, so that both see the same
load at the same moments; the ratio is the median over rounds of harness round / the plain round next to it.  On a
machine shared with other jobs the ``alternate`` ratios of one backend spread over +-30% (load changes between the
subprocesses); the paired ones stay within a few percent, so the verdict is taken from them when both are run.

Threads: ``--threads 1`` (the default) pins one intra-op thread on both sides.  On a small shared machine a
multi-threaded BLAS / OpenMP pool that spin-waits for a core taken by another process makes single steps 10-50x
slower at random (measured here: a 100x784x256 matmul took 0.4 ms with one thread, 1-35 ms with two), which would
drown a 10% question; ``--threads 0`` keeps each framework's default.

Allocator: ``--malloc fixed`` (the default) sets ``MALLOC_MMAP_THRESHOLD_`` (32 MiB) and ``MALLOC_TRIM_THRESHOLD_``
for every process on both sides.  Otherwise glibc's *dynamic* mmap threshold makes a step's temporaries (800 KB for the
MLP's first layer) fresh ``mmap``s with page faults in one process and reused heap in another, depending on what the
process allocated before: measured here, the plain NumPy loop at batch 1 took 1.45 ms a step with 360 page faults a
step in a fresh process and 1.05 ms with none once the threshold had moved (the harness's worker always has, after its
correctness run) -- a 40% difference that is neither side's overhead.  ``--malloc default`` leaves glibc alone.

Writes ``benchmarks/overhead.md`` (the tables, with machine, versions and settings) and ``benchmarks/overhead.json``
(every measurement).  Timings on a shared machine are noisy: compare ratios from one run, never absolute times.
Exit code 1 if a backend's verdict is not ``ok``.
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

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

import backends  # noqa: E402
from harness import runner  # noqa: E402
from harness.results import machine as harness_machine  # noqa: E402
from harness.status import Status  # noqa: E402
from models import get_model  # noqa: E402

PLAIN = {"numpy": "numpy_loop.py", "tf1": "tf1_loop.py", "tf2": "tf2_loop.py", "keras": "keras_loop.py",
         "keras-jax": "keras_loop.py", "keras-torch": "keras_loop.py", "torch": "torch_loop.py", "jax": "jax_loop.py"}
LIMIT = 1.10  # the bar: harness per-step time <= 1.10 x the plain loop's
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(32 * 2**20), "MALLOC_TRIM_THRESHOLD_": str(2**30)}  # see the docstring
DISTRIBUTIONS = ("numpy", "tensorflow-cpu", "tensorflow", "keras", "torch", "jax", "jaxlib", "optax")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------- the two sides
def export_job(model: str, batches: list[int], steps: int, dtype: str, seed: int, work: Path) -> dict[int, Path]:
    """The harness's own first ``steps`` batches and initial weights, one .npz per batch size, for ``--data``."""
    cfg = runner.CompareConfig(model=model, batch_sizes=batches, steps=steps, dtype=dtype, seed=seed)
    job = runner.prepare(cfg, runner.validate(cfg))
    out = {}
    for bs in batches:
        idx = job.order(bs)[:steps]
        path = work / f"{model}-b{bs}.npz"
        np.savez(path, xs=job.data["x"][idx], ys=job.data["y"][idx], **{f"w{j}": w for j, w in enumerate(job.weights)})
        out[bs] = path
    return out


def _json_line(proc: subprocess.CompletedProcess) -> dict:
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return {"error": f"exit code {proc.returncode}: " + " | ".join(proc.stderr.strip().splitlines()[-3:])}


def plain_once(backend: str, model: str, batch: int, dtype: str, steps: int, rounds: int, threads: int | None,
               data: Path | None, feed: str = "tensor", timeout: float = 900) -> dict:
    """One plain-loop subprocess; its JSON line, or {"error": ...}.  With ``data`` (the harness's batches and
    weights), one untimed round first: the harness times a model that has already trained ``steps`` steps."""
    cmd = [sys.executable, str(HERE / "plain" / PLAIN[backend]), "--model", model, "--batch-size", str(batch),
           "--dtype", dtype, "--steps", str(steps), "--rounds", str(rounds), "--feed", feed]
    if data is not None:
        cmd += ["--data", str(data), "--pretrain", "1"]
    if threads:
        cmd += ["--threads", str(threads)]
    env = runner.subprocess_env(backend, dtype, threads)
    try:
        return _json_line(subprocess.run(cmd, env=env, cwd=str(ROOT), capture_output=True, text=True, timeout=timeout))
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout:g} s"}


def harness_once(backend: str, model: str, batches: list[int], dtype: str, steps: int, rounds: int,
                 threads: int | None, seed: int) -> dict[int, dict]:
    """One ``compare`` call for one backend; {batch: {"median_s", "per_round_s", "status", "losses"} or {"error"}}."""
    cfg = runner.CompareConfig(model=model, backends=[backend], batch_sizes=batches, steps=steps, dtype=dtype,
                               timing=True, timing_rounds=rounds, timing_steps=steps, threads=threads, seed=seed)
    result = runner.compare(cfg)
    out = {}
    for row in result["rows"]:
        t = (row.get("meta") or {}).get("timing")
        if t:
            losses = row.get("arrays", {}).get("losses")
            out[row["batch_size"]] = {"median_s": t["median_s"], "iqr_s": t["iqr_s"], "warmup_s": t["warmup_s"],
                                      "per_round_s": t.get("per_round_s"), "status": row["status"],
                                      "losses": None if losses is None else losses.tolist()}
        else:
            out[row["batch_size"]] = {"error": f"{row['status']}: {row.get('reason')}"}
    return out


def paired_once(backend: str, model: str, batch: int, dtype: str, steps: int, rounds: int, threads: int | None,
                data: Path, timeout: float = 1800) -> dict:
    """The harness's backend Model and the plain loop in one subprocess, rounds alternated (``_paired.py``)."""
    cmd = [sys.executable, str(HERE / "_paired.py"), backend, "--model", model, "--batch-size", str(batch),
           "--dtype", dtype, "--steps", str(steps), "--rounds", str(rounds), "--data", str(data)]
    if threads:
        cmd += ["--threads", str(threads)]
    env = runner.subprocess_env(backend, dtype, threads)
    try:
        return _json_line(subprocess.run(cmd, env=env, cwd=str(ROOT), capture_output=True, text=True, timeout=timeout))
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout:g} s"}


# ------------------------------------------------------------------------------------------------- summaries
def scaled_err(a, b, n: int = 10) -> float | None:
    """max over the first ``n`` steps of |a - b| / max(|a|, |b|): did the plain loop compute the same numbers?"""
    if not a or not b:
        return None
    k = min(n, len(a), len(b))
    a, b = np.asarray(a[:k], np.float64), np.asarray(b[:k], np.float64)
    return float(np.max(np.abs(a - b) / np.maximum(np.maximum(np.abs(a), np.abs(b)), 1e-30)))


def summarize_alternate(pairs: list[tuple[dict, dict]], diag: list[dict]) -> dict:
    ok = [(h, p) for h, p in pairs if "median_s" in h and "median_s" in p]
    if not ok:
        errs = [h.get("error") or p.get("error") for h, p in pairs]
        return {"error": next((e for e in errs if e), "no measurement")}
    ratios = [h["median_s"] / p["median_s"] for h, p in ok]
    s = {"harness_s": statistics.median(h["median_s"] for h, _ in ok),
         "plain_s": statistics.median(p["median_s"] for _, p in ok),
         "ratio": statistics.median(ratios), "ratio_lo": min(ratios), "ratio_hi": max(ratios), "n": len(ok),
         "status": sorted({h["status"] for h, _ in ok})}
    mins = [min(h["per_round_s"]) / min(p["per_round_s"]) for h, p in ok if h.get("per_round_s")]
    if mins:
        s["ratio_of_minima"] = statistics.median(mins)
    errs = [e for e in (scaled_err(h.get("losses"), p.get("first_losses")) for h, p in ok
                        if p.get("data") != "random") if e is not None]
    if errs:
        s["loss_err"] = max(errs)
    d = [x["median_s"] for x in diag if "median_s" in x]
    if d:
        s["plain_numpy_feed_s"] = statistics.median(d)
    return s


def summarize_paired(d: dict) -> dict:
    if "error" in d:
        return {"error": d["error"]}
    h, p = d["per_step_s"]["harness"], d["per_step_s"]["plain"]
    ratios = [a / b for a, b in zip(h, p)]
    q1, q3 = np.percentile(ratios, [25, 75])
    return {"harness_s": statistics.median(h), "plain_s": statistics.median(p), "ratio": statistics.median(ratios),
            "ratio_lo": float(q1), "ratio_hi": float(q3), "n": len(ratios),
            "loss_err": scaled_err(d["first_losses"]["harness"], d["first_losses"]["plain"])}


def verdict(s: dict) -> str:
    """ok / skipped / error (a Status), or "over" / "over (noise?)" when the harness is slower than LIMIT allows."""
    if "error" in s:
        return Status.SKIPPED if s["error"].startswith(Status.SKIPPED) else Status.ERROR
    if s["ratio"] <= LIMIT:
        return Status.OK
    return "over (noise?)" if s["ratio_lo"] <= LIMIT else "over"


def table(results: dict, batches: list[int], kind: str, diagnose: bool = False) -> str:
    spread = "ratio range over repeats" if kind == "alternate" else "ratio IQR over rounds"
    headers = ["backend", "batch", "harness ms/step", "plain ms/step", "ratio", spread]
    if kind == "alternate":
        headers += ["ratio of minima"] + (["plain, NumPy fed, ms/step"] if diagnose else [])
    headers += ["same numbers (first 10 losses, scaled err)", f"verdict (ratio <= {LIMIT:.2f})"]
    rows = []
    for b, per_batch in results.items():
        for bs in batches:
            s = per_batch.get(bs, {"error": "not run"})
            if "error" in s:
                rows.append([b, str(bs)] + ["-"] * (len(headers) - 3) + [s["error"].replace("\n", " ")[:200]])
                continue
            row = [b, str(bs), f"{s['harness_s'] * 1e3:.3f}", f"{s['plain_s'] * 1e3:.3f}", f"{s['ratio']:.2f}",
                   f"{s['ratio_lo']:.2f}-{s['ratio_hi']:.2f}"]
            if kind == "alternate":
                row.append(f"{s['ratio_of_minima']:.2f}" if "ratio_of_minima" in s else "-")
                if diagnose:
                    row.append(f"{s['plain_numpy_feed_s'] * 1e3:.3f}" if "plain_numpy_feed_s" in s else "-")
            row.append(f"{s['loss_err']:.1e}" if s.get("loss_err") is not None else "-")
            rows.append(row + [verdict(s)])
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


# ------------------------------------------------------------------------------------------------- the record
def versions() -> dict:
    out = {}
    for d in DISTRIBUTIONS:
        try:
            out[d] = importlib.metadata.version(d)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def machine() -> str:
    m = harness_machine()  # the same machine description the harness records
    return f"{m['cpu']}, {m['cores']} cores, {m['platform']}, Python {m['python']}"


def commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout
        return out.stdout.strip() + (" (+ uncommitted changes)" if dirty.strip() else "")
    except OSError:
        return "?"


def loadavg() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


# ------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="mnist_mlp", choices=("mnist_mlp", "mnist_cnn"))
    ap.add_argument("--backends", default=",".join(PLAIN), help="comma-separated (default: all with a plain loop)")
    ap.add_argument("--batch-sizes", default="1,100")
    ap.add_argument("--dtype", default=None, choices=("float32", "float64"), help="default: the model's (float32)")
    ap.add_argument("--mode", default="both", choices=("alternate", "paired", "both"))
    ap.add_argument("--steps", type=int, default=20, help="batches per round, both sides (default 20)")
    ap.add_argument("--rounds", type=int, default=5, help="alternate: timed rounds per measurement (default 5)")
    ap.add_argument("--repeats", type=int, default=3, help="alternate: harness/plain pairs per backend (default 3)")
    ap.add_argument("--paired-rounds", type=int, default=30, help="paired: timed rounds per side (default 30)")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads on both sides; 0: framework defaults")
    ap.add_argument("--plain-data", choices=("harness", "random"), default="harness",
                    help="alternate: the plain loops get the harness's batches and initial weights (default), or "
                         "random batches and each framework's own initialisation")
    ap.add_argument("--diagnose", action="store_true", help="alternate: also time each plain loop with --feed numpy")
    ap.add_argument("--malloc", choices=("fixed", "default"), default="fixed",
                    help="fixed: glibc's mmap/trim thresholds pinned for both sides (default); default: untouched")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(HERE / "overhead.md"), help="markdown (default benchmarks/overhead.md); "
                                                                      "the raw JSON goes next to it")
    args = ap.parse_args(argv)

    names = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = [b for b in names if b not in PLAIN]
    if unknown:
        ap.error(f"no plain loop for {', '.join(unknown)}; valid: {', '.join(PLAIN)}")
    batches = runner.parse_int_list(args.batch_sizes, "--batch-sizes")
    if min(args.steps, args.rounds, args.repeats, args.paired_rounds) < 1:
        ap.error("--steps, --rounds, --repeats and --paired-rounds must be at least 1")
    dtype = args.dtype or get_model(args.model).dtype
    threads = args.threads or None
    if args.malloc == "fixed":  # inherited by every subprocess of both sides (subprocess_env copies os.environ)
        for k, v in MALLOC_ENV.items():
            os.environ.setdefault(k, v)
    missing = {b: backends.missing_requirements(b) for b in names}
    run_names = [b for b in names if not missing[b]]
    skipped = {b: {bs: {"error": f"skipped: not installed ({', '.join(m)}): {backends.install_hint(b)}"}
                   for bs in batches} for b, m in missing.items() if m}
    for b, m in skipped.items():
        log(f"{b}: {m[batches[0]]['error']}")

    started = time.time()
    load_before = loadavg()
    raw: dict = {"alternate": {}, "paired": {}}
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="dlcompare-overhead-") as tmp:
        data = export_job(args.model, batches, args.steps, dtype, args.seed, Path(tmp))
        plain_data = data if args.plain_data == "harness" else dict.fromkeys(batches)

        if args.mode in ("paired", "both"):
            raw["paired"] = {b: {} for b in run_names}
            for b in run_names:
                for bs in batches:
                    t = time.perf_counter()
                    d = paired_once(b, args.model, bs, dtype, args.steps, args.paired_rounds, threads, data[bs])
                    raw["paired"][b][bs] = d
                    s = summarize_paired(d)
                    log(f"paired {b:12s} batch {bs:4d}: " + (s["error"] if "error" in s else
                        f"harness {s['harness_s'] * 1e3:8.3f} ms  plain {s['plain_s'] * 1e3:8.3f} ms  ratio "
                        f"{s['ratio']:.2f}") + f"  ({time.perf_counter() - t:.0f} s)")
            results["paired"] = {b: {bs: summarize_paired(raw["paired"][b][bs]) for bs in batches} for b in run_names}
            results["paired"].update(skipped)

        if args.mode in ("alternate", "both"):
            alt = raw["alternate"] = {b: {bs: {"pairs": [], "diag": []} for bs in batches} for b in run_names}

            def plain_side(b: str, feed: str = "tensor") -> dict[int, dict]:
                return {bs: plain_once(b, args.model, bs, dtype, args.steps, args.rounds, threads, plain_data[bs], feed)
                        for bs in batches}

            for r in range(args.repeats):
                for i, b in enumerate(run_names):
                    order = ("plain", "harness") if (r + i) % 2 == 0 else ("harness", "plain")
                    for side in order:
                        t = time.perf_counter()
                        if side == "plain":
                            plain = plain_side(b)
                        else:
                            harness = harness_once(b, args.model, batches, dtype, args.steps, args.rounds, threads,
                                                   args.seed)
                        log(f"repeat {r + 1}/{args.repeats} {b:12s} {side:8s} {time.perf_counter() - t:6.1f} s")
                    for bs in batches:
                        h, p = harness.get(bs, {"error": "no row"}), plain[bs]
                        alt[b][bs]["pairs"].append((h, p))
                        log(f"    batch {bs:4d}: " + (
                            f"harness {h['median_s'] * 1e3:8.3f} ms  plain {p['median_s'] * 1e3:8.3f} ms  ratio "
                            f"{h['median_s'] / p['median_s']:.2f}" if "median_s" in h and "median_s" in p
                            else str(h.get("error") or p.get("error"))))
                    if args.diagnose:
                        for bs, d in plain_side(b, feed="numpy").items():
                            alt[b][bs]["diag"].append(d)
            results["alternate"] = {b: {bs: summarize_alternate(alt[b][bs]["pairs"], alt[b][bs]["diag"])
                                        for bs in batches} for b in run_names}
            results["alternate"].update(skipped)
    load_after = loadavg()

    settings = (f"model `{args.model}`, dtype {dtype}, batch sizes {batches}, {args.steps} in-memory batches per round "
                f"(the harness's own, and its initial weights, seed {args.seed}), threads: "
                f"{threads or 'framework defaults'}, glibc malloc: "
                + (", ".join(f"{k}={os.environ[k]}" for k in MALLOC_ENV) if args.malloc == "fixed" else "defaults"))
    sections = []
    if "paired" in results:
        sections += [f"## Paired: harness Model and plain loop in one process, {args.paired_rounds} alternated rounds "
                     "each (the verdict)", "",
                     "ratio = median over rounds of (harness round / the plain round next to it); its IQR over the "
                     "rounds.", "", table(results["paired"], batches, "paired"), ""]
    if "alternate" in results:
        sections += [f"## Alternate: `harness.runner.compare(...)` vs the plain loop's subprocess, {args.repeats} "
                     f"interleaved pairs, {args.rounds} rounds each", "",
                     "ratio = median over the pairs of (harness median / plain median); range over the pairs; ratio "
                     "of minima = median over the pairs of (fastest harness round / fastest plain round); plain data: "
                     + ("the harness's, one untimed round first." if args.plain_data == "harness" else "random."), "",
                     table(results["alternate"], batches, "alternate", args.diagnose), ""]
    text = "\n".join(sections)
    print(text)
    doc = "\n".join([
        "# Harness overhead vs plain loops (generated by `benchmarks/overhead.py`; do not edit)",
        "",
        f"- date: {time.strftime('%Y-%m-%d %H:%M', time.localtime(started))}, took {(time.time() - started) / 60:.1f} min",
        f"- machine: {machine()}",
        f"- load average (1/5/15 min) before: {load_before}, after: {load_after} (other jobs share the machine)",
        f"- versions: {', '.join(f'{k} {v}' for k, v in versions().items())}",
        f"- commit: {commit()}",
        f"- settings: {settings}",
        "- same numbers: the plain loop's first losses against the harness's on the same batches from the same initial "
        "weights; float32 noise between correct implementations is <= ~1e-5 (shared/guides/numerics.md section 6)",
        "- timings on a shared machine are noisy: read the ratios, not the absolute times",
        "",
        text,
    ])
    Path(args.out).write_text(doc)
    Path(args.out).with_suffix(".json").write_text(json.dumps(
        {"settings": vars(args), "dtype": dtype, "machine": machine(), "versions": versions(), "commit": commit(),
         "load_before": load_before, "load_after": load_after, "raw": raw, "summary": results}, indent=1, default=str))
    log(f"wrote {args.out} and {Path(args.out).with_suffix('.json')}")
    decisive = results.get("paired") or results.get("alternate") or {}
    return 1 if any(verdict(s) not in (Status.OK, Status.SKIPPED) for d in decisive.values() for s in d.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
