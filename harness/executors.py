"""Where the cells of a comparison run: on this machine, one after another (``local``, the default), or as Ray tasks
on a cluster (``ray``: ``--executor ray``).

A *group* is one compare run: one model, dtype, mode and seed, written as one raw record.  Its cells are the oracle
(the NumPy float64 oracle and its rounding variants, ``runner.run_oracle``) and one cell per backend and device (every
batch size of that backend on that device, in one worker subprocess).  Both executors run the very same functions on
a cell, ``oracle_work`` and ``cell_work`` (``runner.run_backend`` starts ``python -m harness.worker``; the rows are
judged against the oracle where they were computed), so a row is computed identically wherever it runs, and the
calling process never imports a framework.

Ray placement (``RayExecutor``): every cell asks for at least one CPU, a CUDA cell for a GPU; a *timed* cell is pinned
to one node and asks for all of that node's CPUs (and, on CUDA, all of its GPUs), so no other cell shares its cores or
GPU while it is timed; agreement-only cells (``--no-timing``) pack freely.  Tasks are never retried (a crash is an
``error`` row for that cell, not a silent second run), the data, initial weights and batch orders of a group are put
in the object store once and shipped to every node, and each row records the node that computed it (``row.node``).
"""

from __future__ import annotations

import copy
import os
import socket
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import backends

from . import runner
from .rows import Row
from .status import GOOD, Status

# the driver's settings that change what a worker computes or where it finds things; a Ray task sets (or unsets) them
# like the driver before it starts its worker, so a row computed on a node is the row the driver's machine computes
THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
FORWARDED_ENV = (backends.PLUGINS_ENV, "DLCOMPARE_DATA_DIR", "DLCOMPARE_ENV_NAME", "TF_ENABLE_ONEDNN_OPTS",
                 "TF_DETERMINISTIC_OPS", "XLA_FLAGS", "JAX_PLATFORMS", "TF_CPP_MIN_LOG_LEVEL", *THREAD_ENV)
EXECUTORS = ("local", "ray")
RAY_HINT = "pip install -c constraints.txt '.[ray]'"


# ------------------------------------------------------------------------------------------------------ the work units
@dataclass
class Cell:
    """One backend on one device: every batch size of the group's config, in one worker subprocess."""

    group: int
    index: int  # its place in the group: rows are kept in this order whatever order cells finish in
    backend: str
    device: str
    runs: list[dict]
    options: dict
    timeout: float
    timed: bool

    @property
    def key(self) -> tuple[int, int]:
        return self.group, self.index


@dataclass
class Group:
    """One compare run (one raw record): its config, spec, job (data, weights, batch orders), cells and result."""

    index: int
    cfg: runner.CompareConfig
    spec: object
    job: runner.Job
    options: dict
    cells: list[Cell]
    result: dict
    oracle: runner.Oracle | None = None
    rows: dict[int, list[Row]] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.spec.name} {self.spec.dtype} {self.cfg.mode} seed {self.cfg.seed}"

    @property
    def done(self) -> bool:
        return len(self.rows) == len(self.cells)


def plan(cfg: runner.CompareConfig, index: int = 0) -> Group:
    """The group of one compare config: validated, its job prepared once, one cell per backend and device."""
    spec = runner.validate(cfg)
    job = runner.prepare(cfg, spec)
    options = {"dtype": spec.dtype, "mode": cfg.mode, "threads": cfg.threads, "fast": cfg.fast}
    timing = {"rounds": cfg.timing_rounds, "steps": cfg.timing_steps} if cfg.timing else None
    cells = []
    for b in cfg.backends:
        for d in cfg.devices:
            runs = [{"seed": cfg.seed, "batch_size": bs, "device": d, "steps": cfg.steps, "check_every": cfg.check_every,
                     "timing": timing, "repeat": cfg.repeat} for bs in job.batch_sizes]
            cells.append(Cell(index, len(cells), b, d, runs, options, cfg.timeout, bool(timing)))
    result = {"config": asdict(cfg), "spec": spec, "job": job, "rows": [], "oracle": {}, "interrupted": False,
              "started": time.time()}
    return Group(index, cfg, spec, job, options, cells, result)


def oracle_work(job: runner.Job, cfg: runner.CompareConfig, options: dict,
                progress: Callable[[str], None] = lambda s: None) -> runner.Oracle:
    with tempfile.TemporaryDirectory(prefix="dlcompare-") as tmp:
        return runner.run_oracle(job, options["dtype"], cfg.steps, cfg.check_every, options, cfg.timeout, Path(tmp),
                                 progress)


def cell_work(spec, job: runner.Job, oracle: runner.Oracle, cell: Cell, node: dict) -> list[Row]:
    """Run one cell's worker subprocess and judge its rows against the oracle; each row records ``node``."""
    with tempfile.TemporaryDirectory(prefix="dlcompare-") as tmp:
        try:
            rows = runner.run_backend(cell.backend, job, cell.runs, cell.options, cell.timeout, Path(tmp))
        except runner.Interrupted as e:
            raise runner.Interrupted([runner.judge(spec, r, oracle, job).but(node=node) for r in e.rows]) from None
    return [runner.judge(spec, r, oracle, job).but(node=node) for r in rows]


def placeholder_rows(cell: Cell, status: Status, reason: str, node: dict | None = None) -> list[Row]:
    """The rows of a cell that produced none (cancelled, its task died, no node can run it)."""
    o = cell.options
    return [Row(backend=cell.backend, dtype=o["dtype"], mode=o["mode"], fast=bool(o.get("fast")), batch_size=r["batch_size"],
                device=r["device"], seed=r["seed"], status=status, reason=reason, node=node) for r in cell.runs]


# ---------------------------------------------------------------------------------------------------------- provenance
def gpu_names() -> list[str]:
    """NVIDIA GPUs of this machine, by model name, without importing a framework."""
    names = []
    root = Path("/proc/driver/nvidia/gpus")
    for d in sorted(root.iterdir()) if root.exists() else []:
        try:
            for line in (d / "information").read_text().splitlines():
                if line.startswith("Model:"):
                    names.append(line.split(":", 1)[1].strip())
        except OSError:
            continue
    return names


def node_info(executor: str) -> dict:
    """The machine a row was computed on: the speed table compares only rows of one node."""
    from .results import machine

    m = machine()
    out = {"executor": executor, "hostname": socket.gethostname(), "cpu": m["cpu"], "cores": m["cores"],
           "gpus": gpu_names()}
    if executor == "ray":
        import ray

        from .results import git_commit

        out["ray_node"] = ray.get_runtime_context().get_node_id()
        out["commit"] = git_commit()  # of the dlcompare this node runs: it should be the command's
    return out


def node_label(node: dict | None) -> str:
    """A short name of a row's node; rows of one run and one label were timed on the same machine."""
    if not node:
        return "-"
    label = f"{node.get('hostname', '?')} ({node.get('cores', '?')} cores"
    label += f", {', '.join(node['gpus'])}" if node.get("gpus") else ""
    label += f", ray node {node['ray_node'][:8]}" if node.get("ray_node") else ""
    return label + ")"


def driver_context() -> dict:
    """What a Ray task needs from the driver's process: the forwarded settings and the user's registered files."""
    return {"env": {k: os.environ.get(k) for k in FORWARDED_ENV},
            "files": {name: info.path for name, info in backends.registered_files().items()}}


def apply_context(ctx: dict) -> None:
    """Set the driver's settings in this (Ray worker) process; a setting the driver lacks is removed (Ray sets
    OMP_NUM_THREADS to a task's CPU count; the local runner does not)."""
    for k, v in ctx["env"].items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    for name, path in ctx["files"].items():
        if backends.registered_files().get(name) is None:
            backends.register_file(name, path)


# ------------------------------------------------------------------------------------------------------------ local
class LocalExecutor:
    """Today's runner: on this machine, the oracle then each cell of each group, one subprocess at a time."""

    name = "local"

    def describe(self) -> dict:
        return {"name": self.name, "nodes": [node_info(self.name)]}

    def run(self, groups: list[Group], on_oracle, on_cell, progress: Callable[[str], None]) -> None:
        node = node_info(self.name)
        total = sum(len(g.cells) for g in groups)
        n = 0
        for g in groups:
            if len(groups) > 1:
                progress(f"== {g.label} ==")
            try:
                on_oracle(g, oracle_work(g.job, g.cfg, g.options, progress))
            except runner.Interrupted:  # Ctrl-C during the oracle: no row of this group has run yet
                raise KeyboardInterrupt from None
            for cell in g.cells:
                n += 1
                t = time.perf_counter()
                where = f"{cell.backend}" + (f" {cell.device}" if len(g.cfg.devices) > 1 else "")
                progress(f"[{n}/{total}] {where} ...")
                try:
                    rows = cell_work(g.spec, g.job, g.oracle, cell, node)
                except runner.Interrupted as e:
                    on_cell(cell, e.rows)
                    raise KeyboardInterrupt from None
                on_cell(cell, rows)
                progress(f"[{n}/{total}] {where}: " + ", ".join(f"batch {r['batch_size']} {r['device']} {r['status']}"
                                                               for r in rows)
                         + f" ({time.perf_counter() - t:.1f} s)")

    def close(self) -> None:
        pass


# -------------------------------------------------------------------------------------------------------------- ray
def _ray():
    try:
        import ray
    except ImportError:
        raise runner.UserError(f"--executor ray needs Ray, which is not installed: {RAY_HINT}") from None
    return ray


def _oracle_task(job: runner.Job, cfg: runner.CompareConfig, options: dict, ctx: dict) -> runner.Oracle:
    apply_context(ctx)
    return oracle_work(job, cfg, options)


def _cell_task(spec, job, oracle, cell: Cell, ctx: dict, tracker) -> dict:
    apply_context(ctx)
    node = node_info("ray")
    tracker.started.remote(cell.key, node_label(node))
    t = time.perf_counter()
    # arrays from the object store are read-only views: the judge and the diagnosis get their own copies
    job = replace(job, data={k: v.copy() for k, v in job.data.items()})
    rows = cell_work(spec, job, copy.deepcopy(oracle), cell, node)
    return {"rows": rows, "seconds": time.perf_counter() - t, "node": node}


def _probe(address: str, timeout_s: float = 5.0) -> None:
    """Fail fast on a HOST:PORT where nothing listens (ray.init would retry for minutes); other forms ("auto",
    "ray://...") are left to Ray."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or "/" in address:
        return
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise runner.UserError(f"no Ray cluster answers at {address!r} (from --ray-address or RAY_ADDRESS: {e}); "
                               f"start one there with `ray start --head --port {port}`, check the address "
                               f"`ray start` printed, or leave --ray-address and RAY_ADDRESS unset for a Ray instance on "
                               f"this machine") from None


class _Tracker:
    """Which cells have started, and where (a zero-CPU actor the tasks report to)."""

    def __init__(self):
        self.running: dict[tuple, str] = {}

    def started(self, key: tuple, where: str) -> None:
        self.running[key] = where

    def snapshot(self) -> dict[tuple, str]:
        return dict(self.running)


def ray_error_reason(e: BaseException) -> str:
    """What a failed Ray task says, first lines only: the worker process died, the node died, a bug in a task."""
    text = str(e).strip().splitlines()
    return f"the Ray task failed ({type(e).__name__}): " + " ".join(t.strip() for t in text[:3])[:400]


class RayExecutor:
    """Cells as Ray tasks on the cluster at ``address`` (``--ray-address``, else ``$RAY_ADDRESS``, else a Ray instance
    started here for the run and stopped after it)."""

    name = "ray"
    STATUS_EVERY_S = 30.0
    NODES_EVERY_S = 5.0

    def __init__(self, address: str | None = None):
        self.ray = _ray()
        self.address = address or os.environ.get("RAY_ADDRESS") or None
        if self.address:
            _probe(self.address)  # a wrong address fails before any work starts
        self.started_here = False
        self._rr: dict[bool, int] = {}
        self._warned: set = set()
        from .results import git_commit

        self._commit = git_commit()

    def start(self) -> None:
        ray = self.ray
        if ray.is_initialized():
            return
        import logging

        kwargs = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.WARNING}
        try:
            if self.address:
                ray.init(address=self.address, **kwargs)
            else:
                ray.init(address="local", num_cpus=os.cpu_count(), **kwargs)
                self.started_here = True
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise runner.UserError(f"cannot connect to the Ray cluster at {self.address!r} ({e}); start one with "
                                   f"`ray start --head`, pass its address with --ray-address HOST:PORT, or leave "
                                   f"--ray-address and RAY_ADDRESS unset for a Ray instance on this machine") from None

    def nodes(self) -> list[dict]:
        return [n for n in self.ray.nodes() if n.get("Alive")]

    def describe(self) -> dict:
        self.start()
        return {"name": self.name, "address": self.address or "local instance",
                "nodes": [{"hostname": n.get("NodeManagerHostname"), "ray_node": n["NodeID"],
                           "resources": {k: v for k, v in n.get("Resources", {}).items()
                                         if k in ("CPU", "GPU") or not k.startswith(("node:", "object_store", "memory"))}}
                          for n in self.nodes()]}

    def placement(self, cell: Cell) -> dict | None:
        """Ray options of a cell, or None when no node of the cluster can run it (a CUDA cell and no GPU)."""
        gpu = cell.device == "cuda"
        fit = [n for n in self.nodes() if n["Resources"].get("CPU", 0) >= 1 and (not gpu or n["Resources"].get("GPU"))]
        if not fit:
            return None
        if not cell.timed:
            return {"num_cpus": 1, "num_gpus": 1 if gpu else 0}
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        i = self._rr.get(gpu, 0)
        self._rr[gpu] = i + 1
        n = fit[i % len(fit)]  # the timed cells go round the nodes that can run them, each holding its whole node
        return {"num_cpus": n["Resources"]["CPU"], "num_gpus": n["Resources"].get("GPU", 0) if gpu else 0,
                "scheduling_strategy": NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)}

    def run(self, groups: list[Group], on_oracle, on_cell, progress: Callable[[str], None]) -> None:
        ray = self.ray
        self.start()
        ctx = driver_context()
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        # on the driver's node: a node that leaves the cluster mid-run takes its cells, never the bookkeeping
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
        tracker = ray.remote(num_cpus=0)(_Tracker).options(scheduling_strategy=here).remote()

        def started() -> dict:
            return self._snapshot(tracker)

        oracle_fn = ray.remote(max_retries=0)(_oracle_task)
        cell_fn = ray.remote(max_retries=0)(_cell_task)
        pending: dict = {}  # object ref -> ("oracle", group) | ("cell", cell)
        cells = [c for g in groups for c in g.cells]
        nodes = self.nodes()
        progress(f"ray: {len(nodes)} node(s), {sum(n['Resources'].get('CPU', 0) for n in nodes):g} CPUs, "
                 f"{sum(n['Resources'].get('GPU', 0) for n in nodes):g} GPUs; {len(groups)} group(s), {len(cells)} "
                 f"cells" + (" (timed cells hold a whole node each)" if any(c.timed for c in cells) else ""))
        for g in groups:
            if g.cfg.threads is None and not any(c.timed for c in g.cells):
                # an agreement-only cell holds one CPU, so its worker (and the group's oracle) uses one intra-op thread,
                # as --threads 1 sets it; frameworks' default pools, one per core, would fight over the cores of the
                # cells packed beside it (measured: benchmarks/matrix-executors.md)
                g.options = {**g.options, "threads": 1}
                for c in g.cells:
                    c.options = g.options
                g.result["config"]["threads"] = 1
            job_ref = ray.put(g.job)
            oracle_ref = oracle_fn.options(num_cpus=1).remote(job_ref, g.cfg, g.options, ctx)
            pending[oracle_ref] = ("oracle", g)
            for cell in g.cells:
                opts = self.placement(cell)
                if opts is None:
                    on_cell(cell, placeholder_rows(cell, Status.SKIPPED, "no CUDA device: no node of the Ray cluster "
                                                   "has a GPU"))
                    continue
                pending[cell_fn.options(**opts).remote(g.spec, job_ref, oracle_ref, cell, ctx, tracker)] = ("cell", cell)
        finished: set = set()
        last = checked = time.monotonic()
        try:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
                for ref in done:
                    kind, what = pending.pop(ref)
                    if kind == "oracle":
                        try:
                            on_oracle(what, ray.get(ref))
                        except ray.exceptions.RayError as e:
                            on_oracle(what, runner.Oracle({}, {}, [ray_error_reason(e)]))
                        continue
                    finished.add(what.key)
                    try:
                        out = ray.get(ref)
                        rows, line = out["rows"], f"on {node_label(out['node'])} ({out['seconds']:.1f} s)"
                        self._check_commit(out["node"], progress)
                    except ray.exceptions.RayError as e:
                        reason = ray_error_reason(e)
                        rows, line = placeholder_rows(what, Status.ERROR, reason), ""
                    running = len(set(started()) - finished)
                    progress(self._line(groups, what, rows, line, len(finished), running, len(cells)))
                    on_cell(what, rows)
                    last = time.monotonic()
                if time.monotonic() - checked > self.NODES_EVERY_S:
                    checked = time.monotonic()
                    self._drop_unplaceable(pending, finished, started, on_cell, progress)
                if time.monotonic() - last > self.STATUS_EVERY_S:
                    snap = started()
                    now = {k: v for k, v in snap.items() if k not in finished}
                    progress(f"[{len(finished)}/{len(cells)} done, {len(now)} running, "
                             f"{len(cells) - len(finished) - len(now)} queued] running: "
                             + "; ".join(f"{groups[k[0]].cells[k[1]].backend} ({groups[k[0]].label}) on {v}"
                                         for k, v in list(now.items())[:6]))
                    last = time.monotonic()
        except KeyboardInterrupt:
            snap = started()
            for ref in pending:
                ray.cancel(ref)  # queued: dropped; running: KeyboardInterrupt in the task, which kills its worker
            for kind, what in pending.values():
                if kind == "cell" and what.key in snap:
                    on_cell(what, placeholder_rows(what, Status.INTERRUPTED, "interrupted by the user (Ctrl-C)"))
            try:
                ray.wait(list(pending), num_returns=len(pending), timeout=10)
            except Exception:  # noqa: BLE001
                pass
            raise

    def _check_commit(self, node: dict, progress) -> None:
        """Warn once per node that runs another dlcompare commit than this command (its rows may differ)."""
        theirs = node.get("commit")
        if not theirs or theirs == self._commit or node.get("ray_node") in self._warned:
            return
        self._warned.add(node.get("ray_node"))
        progress(f"warning: {node_label(node)} runs dlcompare {theirs}, this command {self._commit}: install the same "
                 f"checkout on every node, or its rows may not be this commit's")

    def _snapshot(self, tracker) -> dict:
        """The cells that have started, and where; empty when the tracker cannot answer (progress only)."""
        try:
            return self.ray.get(tracker.snapshot.remote(), timeout=5)
        except Exception:  # noqa: BLE001 - the counts of a progress line never stop the run
            return {}

    def _drop_unplaceable(self, pending: dict, finished: set, started: Callable[[], dict], on_cell,
                          progress) -> None:
        """A queued CUDA cell waits for a GPU; when the last GPU node has left the cluster it would wait for ever:
        cancel it, with an error row that says why."""
        if not any(kind == "cell" and what.device == "cuda" for kind, what in pending.values()) or \
                any(n["Resources"].get("GPU") for n in self.nodes()):
            return
        running = started()
        for ref, (kind, what) in list(pending.items()):
            if kind == "cell" and what.device == "cuda" and what.key not in running:
                self.ray.cancel(ref)
                del pending[ref]
                finished.add(what.key)
                rows = placeholder_rows(what, Status.ERROR, "no node of the Ray cluster has a GPU any more (the GPU "
                                                            "node left during the run)")
                progress(f"  {what.backend} cuda: {rows[0]['reason']}")
                on_cell(what, rows)

    @staticmethod
    def _line(groups, cell: Cell, rows: list[Row], where: str, done: int, running: int, total: int) -> str:
        g = groups[cell.group]
        text = (f"[{done}/{total} done, {running} running, {total - done - running} queued] {g.label}: "
                f"{cell.backend} {cell.device}: "
                + ", ".join(f"batch {r['batch_size']} {r['status']}" for r in rows) + (f" {where}" if where else ""))
        reasons = [str(r.get("reason")).splitlines()[0][:300] for r in rows if r["status"] not in GOOD and r.get("reason")]
        return text + "".join(f"\n    {r}" for r in dict.fromkeys(reasons))

    def close(self) -> None:
        if self.ray.is_initialized():
            self.ray.shutdown()


def get_executor(name: str, address: str | None = None):
    if name not in EXECUTORS:
        raise runner.UserError(f"unknown executor {name!r}; valid executors: {', '.join(EXECUTORS)}")
    if address and name != "ray":
        raise runner.UserError("--ray-address needs --executor ray")
    return RayExecutor(address) if name == "ray" else LocalExecutor()


# -------------------------------------------------------------------------------------------------------- the groups
def run_groups(cfgs: list[runner.CompareConfig], executor=None, progress: Callable[[str], None] = lambda s: None,
               on_group: Callable[[dict], None] | None = None) -> list[dict]:
    """Run every group of ``cfgs`` on ``executor`` (default: local); ``on_group(result)`` sees each group's result as
    soon as its last cell is in (a matrix writes it there); returns the results in the order of ``cfgs``.

    Ctrl-C: the queued cells are cancelled, a running one becomes ``interrupted`` rows, the finished ones are kept;
    every group with a row is handed to ``on_group`` with ``interrupted`` set."""
    executor = executor or LocalExecutor()
    groups = [plan(cfg, i) for i, cfg in enumerate(cfgs)]
    for g in groups:
        g.result["executor"] = executor.name
        if len(groups) == 1:
            progress(f"model {g.spec.name}: {g.spec.param_count()} parameters, dtype {g.spec.dtype}, mode "
                     f"{g.cfg.mode}, data: {g.job.dataset_source}")
    handed: set[int] = set()

    def finish(g: Group) -> None:
        res = g.result
        res["rows"] = [r for i in sorted(g.rows) for r in g.rows[i]]
        res["pairs"] = runner.pairwise(g.spec, res["rows"], g.oracle or runner.Oracle({}, {}, []), g.job)
        res["finished"] = time.time()
        if on_group and g.index not in handed and (res["rows"] or not res["interrupted"]):
            handed.add(g.index)
            on_group(res)

    def on_oracle(g: Group, oracle: runner.Oracle) -> None:
        g.oracle = oracle
        g.result["oracle"] = {b: r for (_, b), r in oracle.rows.items()}
        g.result["envelope_variants"] = sorted({v for ref in oracle.references.values() for v in ref.variants})
        for p in oracle.problems:
            progress(f"  {g.label}: {p}")
        if g.done:
            finish(g)

    def on_cell(cell: Cell, rows: list[Row]) -> None:
        g = groups[cell.group]
        g.rows[cell.index] = rows
        if any(r.status == Status.INTERRUPTED for r in rows):
            g.result["interrupted"] = True
        if g.done and g.oracle is not None:
            finish(g)

    try:
        executor.run(groups, on_oracle, on_cell, progress)
    except KeyboardInterrupt:
        for g in groups:
            if not g.done or g.oracle is None or g.result["interrupted"]:
                g.result["interrupted"] = True
                finish(g)
    except Exception as e:  # the executor itself failed (a lost cluster, a bug): keep every row already in
        reason = f"the {executor.name} executor failed: {type(e).__name__}: {str(e).strip()[:300]}"
        progress(f"{reason}\n{traceback.format_exc(limit=-3)}")
        for g in groups:
            if "finished" not in g.result:
                for cell in g.cells:
                    g.rows.setdefault(cell.index, placeholder_rows(cell, Status.ERROR, reason))
                g.oracle = g.oracle or runner.Oracle({}, {}, [reason])
                finish(g)
    finally:
        executor.close()
    for g in groups:
        if "finished" not in g.result:
            finish(g)
    return [g.result for g in groups]
