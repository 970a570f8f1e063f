"""The subprocess side of ``benchmarks/test_bench.py``: one backend, its framework imported here and nowhere else.

    python benchmarks/_bench_worker.py BACKEND     (environment: harness.runner.subprocess_env(BACKEND, dtype, threads))

Reads one JSON command per line on stdin and answers one JSON line per command on the stdout it was started with
(anything a framework prints goes to stderr instead):

* ``{"cmd": "build", "model", "batch_size", "steps", "dtype", "threads", "seed"}``: the backend's ``Model`` from the
  spec and the harness's canonical initial weights, and ``steps`` batches of the harness's own data and batch order,
  stacked in memory as the harness stacks them -> ``{"ok": true, "version", "build_s"}``, ``{"skip": reason}``
  (framework missing, configuration unsupported) or ``{"error": traceback}``;
* ``{"cmd": "round"}``: ``model.train_steps(xs, ys)`` -- the call the harness times -- between two ``model.sync()``
  -> ``{"ok": true, "worker_s": seconds measured here, "finite": bool}``;
* ``{"cmd": "quit"}``.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> int:
    backend = sys.argv[1]
    reply_stream = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # a framework's chatter on fd 1 must not interleave with the replies
    sys.stdout = sys.stderr

    def reply(obj: dict) -> None:
        reply_stream.write(json.dumps(obj) + "\n")
        reply_stream.flush()

    import numpy as np

    import backends
    from backends.base import BuildOptions, Unsupported
    from harness import runner
    from models import get_model, init_weights

    mod = None
    model = xs = ys = None
    for line in sys.stdin:
        cmd = json.loads(line)
        try:
            if cmd["cmd"] == "quit":
                break
            if cmd["cmd"] == "build":
                if mod is None:
                    try:
                        mod = backends.load(backend)
                        version = mod.probe()
                    except ImportError as e:
                        reply({"skip": f"{backend}: not installed ({e}): {backends.install_hint(backend)}"})
                        continue
                model = None
                cfg = runner.CompareConfig(model=cmd["model"], backends=[backend], batch_sizes=[cmd["batch_size"]],
                                           steps=cmd["steps"], dtype=cmd["dtype"], seed=cmd["seed"])
                spec = runner.validate(cfg)
                job = runner.prepare(cfg, spec)
                idx = job.order(cmd["batch_size"])[: cmd["steps"]]
                xs = job.data["x"][idx].astype(spec.dtype)  # (steps, B, *input_shape), as harness.worker stacks them
                ys = job.data["y"][idx]
                ys = ys.astype(np.int64) if spec.loss.integer_labels else ys.astype(spec.dtype)
                t = time.perf_counter()
                try:
                    model = mod.Model(spec, init_weights(get_model(cmd["model"]), cmd["seed"]),
                                      BuildOptions(dtype=spec.dtype, threads=cmd.get("threads")))
                    model.sync()
                except Unsupported as e:
                    reply({"skip": f"{backend}: {e}"})
                    continue
                reply({"ok": True, "version": version, "build_s": time.perf_counter() - t})
            elif cmd["cmd"] == "round":
                model.sync()
                t = time.perf_counter()
                losses = model.train_steps(xs, ys)
                model.sync()
                reply({"ok": True, "worker_s": time.perf_counter() - t, "finite": bool(np.all(np.isfinite(losses)))})
            else:
                reply({"error": f"unknown command {cmd['cmd']!r}"})
        except Exception:
            reply({"error": traceback.format_exc()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
