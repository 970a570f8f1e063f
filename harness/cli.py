"""``harness``: a thin command line over functions that the tests call too.

Exit codes: 0 every row is good (``harness.status.GOOD``: pass, skipped, or a native verdict); 1 a row is fail, error
or diverged; 2 bad input; 130 interrupted.  ``harness check``: 0 every row of the user's file passed (some may be
skipped, not all); 1 a row failed, diverged or is an error (an exception in the user's code, output of the wrong
shape), or nothing was checked; 2 bad input found before any work (no such file, not a .py file, a name taken by a
built-in backend, a syntax error, a required function missing, an unknown model or option); 130 interrupted.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import backends
from models import MODELS, get_model
from models.data import DATASETS, DataError
from models.zoo import is_model_file

from . import runner
from .executors import EXECUTORS, get_executor
from .runner import UserError
from .status import GOOD, Status
from .sweep import DEFAULT_BATCH_SIZES as DEFAULT_SWEEP_BATCHES


def _err(msg: str) -> None:
    print(f"harness: error: {msg}", file=sys.stderr)


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------------------- list
def cmd_list(args) -> int:
    from tabulate import tabulate

    print("Models")
    print(tabulate([[m.name, f"{m.param_count():,}", m.dataset, "/".join(map(str, m.batch_sizes)), m.dtype,
                     m.description] for m in MODELS.values()],
                   headers=["model", "params", "dataset", "batch", "dtype", "description"]))
    print("\nBackends")
    rows = []
    for name, info in backends.REGISTRY.items():
        missing = backends.missing_requirements(name)
        state = "installed" if not missing else f"missing {', '.join(missing)}: {backends.install_hint(name)}"
        rows.append([name, backends.version(name) or "-", state, info.description])
    print(tabulate(rows, headers=["backend", "version", "status", "what"]))
    print("\nDevices")
    print(f"cpu: {os.cpu_count()} cores; cuda: " + _cuda_summary())
    return 0


def _cuda_summary() -> str:
    """Whether an NVIDIA GPU is visible, without importing any framework."""
    if Path("/proc/driver/nvidia/gpus").exists():
        gpus = list(Path("/proc/driver/nvidia/gpus").iterdir())
        return f"{len(gpus)} NVIDIA GPU(s) visible (each backend checks for itself)"
    return "none visible (rows for --device cuda will say 'skipped: no CUDA device')"


# ---------------------------------------------------------------------------------------------------------- compare
def _devices(text: str) -> list[str]:
    if text == "all":
        return ["cpu", "cuda"]
    return [d.strip() for d in text.split(",") if d.strip()]


def _backends_arg(text: str | None) -> list[str]:
    """--backends of compare and matrix: comma-separated names, default every registered backend."""
    return [b.strip() for b in text.split(",") if b.strip()] if text else list(backends.REGISTRY)


def _register_files(paths: list[str]) -> dict:
    """Read and register each user file (harness.usercode.inspect_file: bad input is a UserError before any work)."""
    from . import usercode

    taken = set(backends.REGISTRY) | set(backends.plugins())
    files = {}
    for p in paths:
        uf = usercode.inspect_file(p, taken)
        if uf.name in files:
            raise UserError(f"{p} and {files[uf.name].shown} have the same name {uf.name!r}, and rows are named by the "
                            f"file's stem; rename one of them")
        backends.register_file(uf.name, str(uf.path))
        files[uf.name] = uf
    return files


def _file_lines(record: dict, files: dict, shown: str = "") -> list[str]:
    """Per user file: what was not checked, each error row's own traceback lines and hint, and where a failing row
    parts with its probable causes (harness.diagnose; left out where ``shown``, the table printed, has them)."""
    from .diagnose import format_diagnosis
    from .usercode import describe_not_checked, error_lines

    out = []
    for name, uf in files.items():
        rows = [r for r in record["rows"] if r["backend"] == name]
        skipped: dict = {}
        for r in rows:
            skipped.update((r.get("meta") or {}).get("not_checked") or {})
        out += [f"{uf.shown}: {line}" for line in describe_not_checked(skipped)]
        errors: dict = {}
        for r in rows:
            ue = (r.get("meta") or {}).get("user_error")
            if r["status"] == Status.ERROR and ue:
                errors.setdefault(json_key(ue), (ue, []))[1].append(r["batch_size"])
            elif r["status"] in (Status.FAIL, Status.DIVERGED, Status.ERROR):
                out.append(f"{uf.shown}: {r['status']} at batch {r['batch_size']}: {r.get('reason')}")
                out += [ln for ln in format_diagnosis(r.get("diagnosis")) if ln not in shown]
        for ue, batches in errors.values():
            out.append(f"{uf.shown}: error at batch {', '.join(map(str, batches))}:")
            out += error_lines(ue, uf.shown)
    return out


def json_key(obj) -> str:
    import json

    return json.dumps(obj, sort_keys=True, default=str)


def cmd_compare(args) -> int:
    from .report import console_table
    from .results import check_writable, to_record, write_run

    if args.quick and args.full:
        raise UserError("--quick and --full exclude each other; pick one")
    if args.quick:  # agreement over 10 steps, 3 short timed rounds, no determinism replay
        args.steps, args.no_repeat, rounds = min(args.steps, 10), True, 3
    elif args.full:  # 200 steps (covers the 1/10/full-run tolerance rows), 10 timed rounds
        args.steps, rounds = max(args.steps, 200), 10
    else:
        rounds = 5
    results_dir = Path(args.results_dir)
    backends_list = _backends_arg(args.backends)
    files = _register_files(args.backend_file or [])
    backends_list += [name for name in files if name not in backends_list]
    cfg = runner.CompareConfig(
        model=args.model, backends=backends_list,
        batch_sizes=runner.parse_int_list(args.batch_sizes, "--batch-sizes") if args.batch_sizes else None,
        steps=args.steps, dtype=args.dtype, devices=_devices(args.device), mode=args.mode, seed=args.seed,
        init=args.init, dataset=args.dataset, data_dir=args.data_dir, check_every=args.check_every,
        timing=not args.no_timing, timeout=args.timeout, threads=args.threads, fast=args.fast,
        repeat=not args.no_repeat, timing_rounds=rounds)
    spec = runner.validate(cfg)
    for uf in files.values():
        uf.check_spec(spec)
    check_writable(results_dir)  # before any work starts
    executor = get_executor(args.executor, args.ray_address)
    result = runner.compare(cfg, progress=_progress, executor=executor)
    json_path, _ = write_run(result, results_dir)
    record = to_record(result, json_path.stem)
    table = console_table(record)
    print(table)
    lines = _file_lines(record, files, table)
    if lines:
        print("\n" + "\n".join(lines))
    print(f"\ndata: {record['data_source']}\nraw results: {json_path} (+ .npz)")
    if result["interrupted"]:
        print("interrupted: finished rows were saved; the partial one is marked 'interrupted'", file=sys.stderr)
        return 130
    bad = [r for r in record["rows"] if r["status"] not in GOOD]
    return 1 if bad else 0


# ----------------------------------------------------------------------------------------------------------- matrix
MATRIX_MODELS = "mlp_431,pima_mlp,mnist_mlp,mnist_cnn"


def parse_seeds(text: str) -> list[int]:
    """``0``, ``0,3,7`` or a range ``0-4`` (both ends included)."""
    out: list[int] = []
    try:
        for part in filter(None, (p.strip() for p in text.split(","))):
            a, sep, b = part.partition("-")
            out += list(range(int(a), int(b) + 1)) if sep else [int(a)]
    except ValueError:
        out = []
    if not out:
        raise UserError(f"--seeds must be seeds like 0, 0,3,7 or a range 0-4, got {text!r}")
    for s in out:
        runner.check_seed(s, "--seeds")
    return list(dict.fromkeys(out))


def _names(text: str, valid, what: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in valid]
    if not names or bad:
        raise UserError(f"{what} must be comma-separated names from: {', '.join(valid)}; got {text!r}")
    return names


def matrix_configs(args) -> list[runner.CompareConfig]:
    """Every (model, dtype, mode, seed) group of ``harness matrix``, validated before any work starts."""
    from models.spec import DTYPES

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if not models:
        raise UserError(f"--models must name at least one model, e.g. {MATRIX_MODELS}")
    dtypes = None if args.dtypes == "model" else _names(args.dtypes, DTYPES, "--dtypes")
    modes = _names(args.modes, ("aligned", "native"), "--modes")
    seeds = parse_seeds(args.seeds)
    backends_list = _backends_arg(args.backends)
    batch_sizes = runner.parse_int_list(args.batch_sizes, "--batch-sizes") if args.batch_sizes else None
    devices = _devices(args.device)
    cfgs = []
    for model in models:
        for dtype in dtypes or [get_model(model).dtype if model in MODELS else None]:
            for mode in modes:
                for seed in seeds:
                    cfg = runner.CompareConfig(
                        model=model, backends=backends_list, dtype=dtype, mode=mode, seed=seed, steps=args.steps,
                        batch_sizes=batch_sizes, devices=devices, timing=not args.no_timing, timeout=args.timeout,
                        threads=args.threads, repeat=not args.no_repeat, data_dir=args.data_dir)
                    runner.validate(cfg)
                    cfgs.append(cfg)
    return cfgs


def cmd_matrix(args) -> int:
    """Models x dtypes x modes x devices x seeds in one command: each (model, dtype, mode, seed) group is an ordinary
    compare run, written to the raw results as soon as its last cell is in; ``harness report`` merges them."""
    from tabulate import tabulate

    from .executors import run_groups
    from .report import status_counts
    from .results import check_writable, write_run

    cfgs = matrix_configs(args)
    results_dir = Path(args.results_dir)
    check_writable(results_dir)
    executor = get_executor(args.executor, args.ray_address)
    n_cells = sum(len(c.backends) * len(c.devices) for c in cfgs)
    _progress(f"matrix: {len(cfgs)} group(s) (model x dtype x mode x seed), {n_cells} backend cells, executor "
              f"{executor.name}")
    summary = []

    def on_group(result: dict) -> None:
        json_path, _ = write_run(result, results_dir)
        cfg = result["config"]
        summary.append([result["spec"].name, result["spec"].dtype, cfg["mode"], cfg["seed"],
                        status_counts(r["status"] for r in result["rows"]) or "-",
                        "interrupted" if result["interrupted"] else "", json_path.name])
        _progress(f"wrote {json_path} ({summary[-1][4]})")

    t = time.perf_counter()
    results = run_groups(cfgs, executor, progress=_progress, on_group=on_group)
    print(tabulate(summary, headers=["model", "dtype", "mode", "seed", "rows", "", "raw result"]))
    print(f"\n{len(summary)} run(s) written to {results_dir / 'raw'} in {time.perf_counter() - t:.1f} s; merge them "
          f"with `harness report`")
    if any(r["interrupted"] for r in results):
        print("interrupted: finished groups and cells were saved; queued cells were cancelled", file=sys.stderr)
        return 130
    return 1 if any(r["status"] not in GOOD for res in results for r in res["rows"]) else 0


# ------------------------------------------------------------------------------------------------------------ check
QUANTITY_WORDS = {"loss": "losses", "grads": "gradients", "weights": "weights", "state": "BatchNorm statistics",
                  "pred": "predictions", "invariance/grads": "gradient batch-size invariance",
                  "invariance/pred": "prediction batch-size invariance"}


def cmd_check(args) -> int:
    """One user file against the NumPy float64 oracle: the compare table of its rows, a verdict, what was not
    checked, the user's own error lines or the probable causes of a failure; the raw record is a compare run's."""
    from .report import console_table
    from .results import check_writable, to_record, write_run

    files = _register_files([args.file])
    (uf,) = files.values()
    cfg = runner.CompareConfig(
        model=args.model, backends=[uf.name],
        batch_sizes=runner.parse_int_list(args.batch_sizes, "--batch-sizes") if args.batch_sizes else None,
        steps=args.steps, dtype=args.dtype, seed=args.seed, init=args.init, dataset=args.dataset,
        data_dir=args.data_dir, check_every=args.check_every, timing=args.timing, timing_rounds=3,
        timeout=args.timeout, threads=args.threads, repeat=not args.no_repeat)
    spec = runner.validate(cfg)
    uf.check_spec(spec)
    results_dir = Path(args.results_dir)
    check_writable(results_dir)  # before any work starts
    result = runner.compare(cfg, progress=_progress)
    json_path, _ = write_run(result, results_dir)
    record = to_record(result, json_path.stem)
    rows = [r for r in record["rows"] if r["backend"] == uf.name]
    table = console_table({**record, "rows": rows})
    print(table)
    bad = [r for r in rows if r["status"] not in GOOD]
    passed = [r for r in rows if r["status"] == Status.PASS]
    where = (f"{spec.name} ({spec.dtype}, {cfg.steps} steps, batch sizes "
             f"{', '.join(str(b) for b in sorted({r['batch_size'] for r in rows}))})")
    if bad:
        what = {Status.FAIL: "parts from the NumPy float64 oracle", Status.DIVERGED: "diverged (NaN or Inf)",
                Status.ERROR: "raised an error or returned what the contract does not allow",
                Status.INTERRUPTED: "was interrupted"}
        found = [st for st in what if any(r["status"] == st for r in bad)]
        verdict = (f"verdict: {'/'.join(map(str, found))}: {uf.shown} {' and '.join(what[st] for st in found)} on "
                   f"{where}; details below")
    elif passed:
        compared = [w for q, w in QUANTITY_WORDS.items()
                    if any(q in ((r.get("agreement") or {}).get("worst") or {}) for r in passed)]
        verdict = (f"verdict: pass: {uf.shown} matches the NumPy float64 oracle on {where}: "
                   f"{', '.join(compared)} within the rounding bound")
    else:
        verdict = ("verdict: not checked: every row was skipped ("
                   + "; ".join(sorted({str(r.get('reason')) for r in rows})) + ")")
    print("\n" + verdict)
    lines = _file_lines(record, files, table)
    if lines:
        print("\n".join(lines))
    print(f"raw results: {json_path} (+ .npz)")
    if result["interrupted"]:
        print("interrupted: finished rows were saved; the partial one is marked 'interrupted'", file=sys.stderr)
        return 130
    return 1 if bad or not passed else 0


# ------------------------------------------------------------------------------------------------------------ train
def cmd_train(args) -> int:
    cfg = runner.TrainConfig(model=args.model, backend=args.backend, epochs=args.epochs, batch_size=args.batch_size,
                             dtype=args.dtype, mode=args.mode, seed=args.seed, init=args.init, dataset=args.dataset,
                             data_dir=args.data_dir, device=args.device, threads=args.threads, fast=args.fast)
    bar = _ProgressBar()

    def on_event(e):
        if e["event"] == "progress":
            bar.update(e["epoch"], e["step"], e["of"])
        elif e["event"] == "epoch":
            bar.clear()
            acc = f"  train acc {e['train_acc']:.4f}" + (f"  test acc {e['test_acc']:.4f}" if "test_acc" in e else "")
            print(f"epoch {e['epoch'] + 1:4d}  loss {e['loss']:.6f}{acc}  ({e['time_s']:.2f} s)", flush=True)

    result = runner.train(cfg, on_event)
    bar.clear()
    if result["status"] != Status.OK:
        print(f"{args.backend}: {result['status']}: {result.get('reason')}", file=sys.stderr)
        return 130 if result["status"] == Status.INTERRUPTED else (0 if result["status"] in GOOD else 1)
    last = result["epochs"][-1] if result["epochs"] else {}
    print(f"data: {result['data_source']}; batch size {result['batch_size']}; "
          f"final train accuracy {last.get('train_acc', float('nan')):.4f}"
          + (f", test accuracy {last['test_acc']:.4f}" if "test_acc" in last else ""))
    return 0


class _ProgressBar:
    """A one-line progress bar on stderr (only when stderr is a terminal)."""

    def __init__(self):
        self.tty = sys.stderr.isatty()
        self.shown = False

    def update(self, epoch, step, of):
        if not self.tty:
            return
        width = 30
        done = int(width * step / max(of, 1))
        sys.stderr.write(f"\repoch {epoch + 1} [{'#' * done}{'.' * (width - done)}] {step}/{of}")
        sys.stderr.flush()
        self.shown = True

    def clear(self):
        if self.shown:
            sys.stderr.write("\r" + " " * 60 + "\r")
            sys.stderr.flush()
            self.shown = False


# ------------------------------------------------------------------------------------------------------------ sweep
def _ints(text: str, what: str) -> list[int]:
    return runner.parse_int_list(text, what) if text else []


def cmd_sweep(args) -> int:
    from . import sweep
    from .results import check_writable

    cfg = sweep.SweepConfig(
        model=args.model, backends=_backends_arg(args.backends),
        batch_sizes=_ints(args.batch_sizes, "--batch-sizes"), widths=_ints(args.widths, "--widths"),
        width_batch=args.width_batch, dtype=args.dtype, device=args.device, threads=args.threads or None,
        rounds=args.rounds, steps=args.steps, seed=args.seed, fast=args.fast, timeout=args.timeout,
        data_dir=args.data_dir)
    sweep.validate(cfg)
    results_dir = Path(args.results_dir)
    check_writable(results_dir)  # before any work starts
    record = sweep.run(cfg, progress=_progress)
    path = sweep.write(record, results_dir)
    written = sweep.write_report(record, results_dir)
    print(sweep.markdown(record).split("## Every point")[0].rstrip())
    print(f"\nraw results: {path}\n" + "\n".join(f"wrote {p}" for p in written))
    if record["interrupted"]:
        return 130
    return 1 if any(r["status"] in ("error", "diverged") for r in record["rows"]) else 0


# ----------------------------------------------------------------------------------------------------------- report
def cmd_report(args) -> int:
    from .report import build_reports

    model = None
    if args.model:
        try:
            model = get_model(args.model).name if args.model not in MODELS else args.model  # a file: its spec's name
        except ValueError as e:
            raise UserError(str(e)) from None
    if args.format != "md":
        return _report_data(args, model)
    if args.output:
        raise UserError("--output goes with --format csv or json (the markdown report writes results/<model>.md)")
    paths = build_reports(Path(args.results_dir), [model] if model else None)
    if not paths:
        print(f"no raw results under {Path(args.results_dir) / 'raw'}; run `harness compare` first")
        return 1
    for p in paths:
        print(f"wrote {p}")
    return 0


def _report_data(args, model: str | None) -> int:
    """``harness report --format csv|json``: every measured row (``harness.results.load_runs``) to stdout or a file."""
    from .results import load_runs

    runs = load_runs(Path(args.results_dir))
    if model is not None and len(runs):
        runs = runs[runs["model"] == model]
    if not len(runs):
        _err(f"no raw results{f' of {model}' if model else ''} under {Path(args.results_dir) / 'raw'}; run "
             f"`harness compare` first")
        return 1
    text = runs.to_csv(index=False) if args.format == "csv" else runs.to_json(orient="records", indent=1)
    if not args.output:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
        return 0
    out = Path(args.output)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        tmp.write_text(text)
        tmp.replace(out)  # never a half-written file
    except OSError as e:
        raise UserError(f"cannot write {out} ({e.strerror or e}); pass a writable --output") from None
    print(f"wrote {out} ({len(runs)} rows)")
    return 0


def cmd_hazards(args) -> int:
    from . import hazards

    results_dir = Path(args.results_dir)
    if args.render:
        record = hazards.latest_record(results_dir)
        md = results_dir / "hazards.md"
        md.write_text(hazards.render(record))
        print(f"wrote {md} from {record.get('run_id')}")
        return 0
    names = [b.strip() for b in args.backends.split(",") if b.strip()] if args.backends else None
    keys = [k.strip() for k in args.probes.split(",") if k.strip()] if args.probes else None
    if args.timeout <= 0:
        raise UserError(f"--timeout must be > 0 seconds, got {args.timeout}")
    from .results import check_writable

    check_writable(results_dir)  # before the long run, not after it
    record = hazards.run_atlas(names, keys, timeout=args.timeout, progress=_progress)
    raw, md = hazards.write_atlas(record, results_dir)
    errors = [(r["probe"], b) for r in record["probes"] for b, c in r["backends"].items()
              if c["native"]["status"] == "error" or c["aligned"]["status"] == "error"]
    measured = sum(1 for r in record["probes"] if hazards.differing(r))
    print(f"{measured} of {len(record['probes'])} probes show a framework default that differs from the spec")
    print(f"wrote {raw}\nwrote {md}")
    for probe, b in errors:
        print(f"error: {b} on probe {probe} (see {md})")
    return 1 if errors else 0


# --------------------------------------------------------------------------------------------------------- selftest
def _selftest_args(args) -> dict:
    """The sweep's options, checked before any work starts."""
    from .selftest import installed_backends

    models = list(MODELS) if args.models == "all" else [m.strip() for m in args.models.split(",") if m.strip()]
    for m in models:
        try:
            get_model(m)  # a built-in name or a model file, validated before any work starts
        except ValueError as e:
            if is_model_file(m):
                raise UserError(f"--models: {e}") from None
            raise UserError(f"unknown model {m!r} in --models; valid: all, {', '.join(MODELS)}, or a model file "
                            f"(path/to/net.py defining SPEC = ModelSpec(...))") from None
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    for d in dtypes:
        if d not in ("float32", "float64"):
            raise UserError(f"unknown dtype {d!r} in --dtypes; valid: float32, float64 (comma-separated)")
    if not models or not dtypes:
        raise UserError("--models and --dtypes each need at least one entry, e.g. --models mnist_mlp --dtypes float32")
    runner.check_positive(args.seeds, "--seeds", "it is how many seeds (0, 1, ...) the clean runs use, e.g. --seeds 5")
    runner.check_positive(args.bug_seeds, "--bug-seeds", "it is how many seeds the planted bugs run on, e.g. 2")
    if args.backends in (None, "all"):
        clean = installed_backends()
    elif args.backends == "none":
        clean = []
    else:
        clean = [b.strip() for b in args.backends.split(",") if b.strip()]
        for b in clean:
            try:
                backends.get_info(b)
            except ValueError as e:
                raise UserError(str(e)) from None
    return {"models": models, "dtypes": dtypes, "seeds": args.seeds, "steps": args.steps, "clean_backends": clean,
            "bug_seeds": args.bug_seeds}


def cmd_selftest(args) -> int:
    from .selftest import format_selftest, run_selftest, save_selftest

    kwargs = _selftest_args(args)
    results_dir = Path(args.results_dir)
    if args.save:
        from .results import check_writable

        check_writable(results_dir)
    result = run_selftest(**kwargs, progress=_progress)
    print(format_selftest(result))
    if args.save:
        for p in save_selftest(result, results_dir, calibration=args.calibrate):
            print(f"wrote {p}")
    return 0 if result["ok"] else 1


def cmd_calibrate(args) -> int:
    args.save, args.calibrate = True, True
    return cmd_selftest(args)


# ------------------------------------------------------------------------------------------------------------- data
def cmd_data_fetch(args) -> int:
    from models.data import fetch

    dest = Path(args.dest).expanduser()
    paths = fetch(args.name, dest, base_url=args.base_url, progress=_progress)
    for p in paths:
        print(p)
    print(f"use it with --data-dir {dest} (or export DLCOMPARE_DATA_DIR={dest})")
    return 0


# ------------------------------------------------------------------------------------------------------------ parser
def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help=f"one of: {', '.join(MODELS)}; or the path of a Python file that "
                                                  f"defines SPEC = ModelSpec(...) (see examples/my_model.py)")
    p.add_argument("--dtype", help="float32 or float64 (default: the model's)")
    p.add_argument("--mode", default="aligned", help="aligned (default: every backend forced to the spec) or native "
                                                     "(each framework's own defaults)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial weights and the batch order "
                                                       "(0 <= seed < 2**32)")
    p.add_argument("--init", help="override the initializer: glorot, normal or uniform")
    p.add_argument("--dataset", help=f"override the data set: {', '.join(DATASETS)}")
    p.add_argument("--data-dir", help="where to look for data first (else $DLCOMPARE_DATA_DIR, caches, bundled)")
    p.add_argument("--threads", type=int, help="intra-op threads for every backend, at least 1 (default: the "
                                                "framework's)")
    p.add_argument("--fast", action="store_true", help="use each backend's fast mode (jit_compile, CUDA graphs, scan)")


def _executor_options(p) -> None:
    p.add_argument("--executor", default="local", choices=EXECUTORS,
                   help="local: one subprocess after another on this machine (default); ray: the cells as Ray tasks "
                        "(pip install '.[ray]')")
    p.add_argument("--ray-address", help="the Ray cluster, e.g. 10.0.0.5:6379 (default: $RAY_ADDRESS, else a Ray "
                                         "instance started on this machine for the run)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="harness", description="Compare the same network across NumPy, TF1, TF2, "
                                     "Keras, PyTorch and JAX: numbers and speed.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("list", help="models, backends (installed or not) and devices")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("compare", help="run backends side by side against the NumPy float64 oracle")
    _common(p)
    p.add_argument("--backends", help=f"comma-separated (default: all): {', '.join(backends.REGISTRY)}")
    p.add_argument("--batch-sizes", help="comma-separated, e.g. 1,100 (default: the model's)")
    p.add_argument("--steps", type=int, default=runner.DEFAULT_STEPS, help="training steps compared per batch size")
    p.add_argument("--check-every", type=int, default=10, help="compare gradients every k-th step")
    p.add_argument("--device", default="cpu", help="cpu, cuda or all")
    p.add_argument("--no-timing", action="store_true", help="agreement only, skip the timed rounds")
    p.add_argument("--no-repeat", action="store_true", help="skip the determinism replay of each trajectory")
    p.add_argument("--quick", action="store_true", help="preset: 10 steps, 3 timed rounds, no replay")
    p.add_argument("--full", action="store_true", help="preset: 200 steps, 10 timed rounds")
    p.add_argument("--timeout", type=float, default=runner.CompareConfig.timeout,
                   help="seconds per backend subprocess, > 0 (default 900)")
    p.add_argument("--backend-file", action="append", metavar="FILE",
                   help="also compare your own implementation in FILE (a .py file with the minimal contract or a "
                        "class Model; see `harness check --help`), named by its stem; repeat the option for more "
                        "files")
    p.add_argument("--results-dir", default=str(_default_results()), help="where raw results and tables go")
    _executor_options(p)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("matrix", help="models x dtypes x modes x devices x seeds in one command, locally or on a "
                                      "Ray cluster; one raw run per (model, dtype, mode, seed)")
    p.add_argument("--models", default=MATRIX_MODELS, help=f"comma-separated (default: {MATRIX_MODELS}); any of "
                                                           f"{', '.join(MODELS)} or a model file")
    p.add_argument("--dtypes", default="model", help="comma-separated float32,float64, or model (default: each "
                                                     "model's own)")
    p.add_argument("--modes", default="aligned", help="comma-separated aligned,native (default: aligned)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or all")
    p.add_argument("--seeds", default="0", help="seeds: 0, 0,3,7 or a range 0-4 (default: 0)")
    p.add_argument("--backends", help=f"comma-separated (default: all): {', '.join(backends.REGISTRY)}")
    p.add_argument("--batch-sizes", help="comma-separated, e.g. 1,100 (default: each model's)")
    p.add_argument("--steps", type=int, default=runner.DEFAULT_STEPS, help="training steps compared per batch size")
    p.add_argument("--no-timing", action="store_true", help="agreement only: cells pack freely on the nodes")
    p.add_argument("--no-repeat", action="store_true", help="skip the determinism replay of each trajectory")
    p.add_argument("--timeout", type=float, default=runner.CompareConfig.timeout,
                   help="seconds per backend subprocess, > 0 (default 900)")
    p.add_argument("--threads", type=int, help="intra-op threads for every backend, at least 1")
    p.add_argument("--data-dir", help="where to look for data first")
    p.add_argument("--results-dir", default=str(_default_results()), help="where raw results go")
    _executor_options(p)
    p.set_defaults(func=cmd_matrix)

    p = sub.add_parser(
        "check", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="check your own implementation (a .py file) against the NumPy float64 oracle",
        description="Check your own implementation of a model against the NumPy float64 oracle: the same initial\n"
                    "weights and batches; losses, gradients, weights and predictions compared step by step.",
        epilog="""FILE defines either a class Model (the full backend contract, backends/base.py) or these
module-level functions (the minimal contract; examples/my_backprop.py is a complete one):

  init(spec, weights)      the spec and the initial weights: arrays in spec.param_names() order,
                           canonical layout (Dense kernel (in, out), bias (out,)), in the run's dtype
  train_step(x, y)         one update on the batch; returns the loss before the update
  get_weights()            the current weights, same order and layout
  gradients(x, y)          optional: (loss, grads) at the current weights, no update
  predict(x)               optional: the network's output (inference mode)
  get_state()              optional: BatchNorm's moving statistics (spec.state_names() order)

A missing optional function means fewer checks (the output says which). A model with Dropout
passes the harness's masks as a third argument: train_step(x, y, masks), gradients(x, y, masks).
The rows are named by the file's stem and written to the results like a compare run's.

exit codes: 0 every row passed; 1 a row failed, diverged or is an error (an exception in your
code, output of the wrong shape), or nothing was checked; 2 bad input found before any work
(no such file, not a .py file, a built-in backend's name, a syntax error, a required function
missing, an unknown model or option); 130 interrupted.""")
    p.add_argument("file", metavar="FILE", help="your implementation, e.g. examples/my_backprop.py")
    p.add_argument("--model", required=True, help=f"the network FILE implements: one of {', '.join(MODELS)}; or a "
                                                  f"model file defining SPEC = ModelSpec(...)")
    p.add_argument("--dtype", help="float32 or float64 (default: the model's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial weights and the batch order")
    p.add_argument("--steps", type=int, default=runner.DEFAULT_STEPS, help="training steps compared per batch size")
    p.add_argument("--batch-sizes", help="comma-separated, e.g. 1,3 (default: the model's)")
    p.add_argument("--check-every", type=int, default=10, help="compare gradients every k-th step")
    p.add_argument("--init", help="override the initializer: glorot, normal or uniform")
    p.add_argument("--dataset", help=f"override the data set: {', '.join(DATASETS)}")
    p.add_argument("--data-dir", help="where to look for data first")
    p.add_argument("--threads", type=int, help="intra-op threads, at least 1")
    p.add_argument("--timing", action="store_true", help="also time the training steps (off by default)")
    p.add_argument("--no-repeat", action="store_true", help="skip the determinism replay (which runs init() again)")
    p.add_argument("--timeout", type=float, default=runner.CompareConfig.timeout,
                   help="seconds for your file's subprocess, > 0 (default 900)")
    p.add_argument("--results-dir", default=str(_default_results()), help="where the raw results go")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("train", help="full training of one backend, with per-epoch loss and accuracy")
    _common(p)
    p.add_argument("--backend", default="numpy")
    p.add_argument("--epochs", type=int, help="default: the model's")
    p.add_argument("--batch-size", type=int, help="default: the model's N")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sweep", help="cost versus work: every backend timed over batch sizes (and MLP widths) beside "
                                     "the machine's measured matrix-multiply rate; tables and log-log plots")
    p.add_argument("--model", default="mnist_mlp", help=f"one of: {', '.join(MODELS)} (default: mnist_mlp)")
    p.add_argument("--backends", help="comma-separated (default: all; those not installed are skipped rows)")
    p.add_argument("--batch-sizes", default=",".join(str(b) for b in DEFAULT_SWEEP_BATCHES),
                   help="comma-separated (default: 1,2,4,...,1024; empty to skip the batch sweep)")
    p.add_argument("--widths", default="", help="comma-separated hidden widths of an MLP, timed at --width-batch, "
                                                "e.g. 16,32,...,2048 (default: none)")
    p.add_argument("--width-batch", type=int, default=100, help="batch size of the width sweep (default 100)")
    p.add_argument("--dtype", help="float32 or float64 (default: the model's)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads of every backend and of the "
                                                          "matrix-multiply measurement (default 1; 0: each framework's "
                                                          "default)")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds per point (default 5)")
    p.add_argument("--steps", type=int, default=10, help="distinct batches per timed round (default 10)")
    p.add_argument("--seed", type=int, default=0, help="initial weights and batch order (default 0)")
    p.add_argument("--fast", action="store_true", help="each backend's fast mode (jit_compile, CUDA graphs, scan)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per backend subprocess (default 1800)")
    p.add_argument("--data-dir", help="where to look for data first")
    p.add_argument("--results-dir", default=str(_default_results()), help="where the raw record, table and plots go")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("report", help="regenerate results/<model>.md from the raw results, or export every row as "
                                      "CSV / JSON")
    p.add_argument("--model", help="only this model (a built-in name or a model file)")
    p.add_argument("--format", default="md", choices=("md", "csv", "json"),
                   help="md (default): write results/<model>.md, sweep tables and plots; csv / json: every measured "
                        "row (harness.results.load_runs) to stdout or --output")
    p.add_argument("--output", help="with --format csv or json: the file to write (default: stdout)")
    p.add_argument("--results-dir", default=str(_default_results()))
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("hazards", help="the porting-hazards atlas: each framework default measured one at a time "
                                        "against the oracle -> results/hazards.md")
    p.add_argument("--backends", help="comma-separated (default: every framework backend)")
    p.add_argument("--probes", help="comma-separated probe keys or names (default: all; see harness/hazards.py)")
    p.add_argument("--render", action="store_true", help="only re-render results/hazards.md from the newest record")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per backend subprocess (default 1800)")
    p.add_argument("--results-dir", default=str(_default_results()))
    p.set_defaults(func=cmd_hazards)

    for name, helptext in (("selftest", "false alarms of every installed backend over many seeds, and the catch "
                                         "rate of planted bugs, per dtype and batch size"),
                           ("calibrate", "the same sweep, written as the evidence for harness/tolerances.py: "
                                         "results/calibration.md (and results/selftest.md)")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--models", default="all", help=f"comma-separated, or all (default): {', '.join(MODELS)}; "
                                                         f"model files (path/to/net.py) too")
        p.add_argument("--dtypes", default="float32,float64", help="comma-separated (default: float32,float64)")
        p.add_argument("--seeds", type=int, default=5 if name == "selftest" else 50,
                       help="clean runs on seeds 0..N-1 (default: %(default)s)")
        p.add_argument("--bug-seeds", type=int, default=2, help="planted bugs on seeds 0..N-1 (default: 2)")
        p.add_argument("--steps", type=int, default=12, help="steps per run (at least 12; default 12)")
        p.add_argument("--backends", help="clean backends: comma-separated, all (default: every installed one) or "
                                          "none (planted bugs only)")
        p.add_argument("--results-dir", default=str(_default_results()))
        if name == "selftest":
            p.add_argument("--save", action="store_true", help="write the raw record and results/selftest.md")
            p.set_defaults(func=cmd_selftest, calibrate=False)
        else:
            p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("data", help="data sets")
    dsub = p.add_subparsers(dest="data_command", required=True)
    f = dsub.add_parser("fetch", help="download a data set with sha256 checks")
    f.add_argument("name", help="mnist or fashion_mnist")
    f.add_argument("--dest", default="~/.dlcompare/data", help="folder to download into")
    f.add_argument("--base-url", help="a mirror serving the four standard files")
    f.set_defaults(func=cmd_data_fetch)
    return parser


def _default_results() -> Path:
    from .runner import PROJECT_ROOT

    return Path(os.environ.get("DLCOMPARE_RESULTS_DIR", PROJECT_ROOT / "results"))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (UserError, DataError, PermissionError) as e:
        _err(str(e))
        return 2
    except KeyboardInterrupt:
        _err("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
