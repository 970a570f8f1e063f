"""The subprocess side of ``benchmarks/test_bench.py``: one backend, its framework imported here and nowhere else.

    python benchmarks/_bench_worker.py BACKEND     (environment: harness.runner.subprocess_env(BACKEND, dtype, threads))

Reads one JSON command per line on stdin and answers one JSON line per command on the stdout it was started with
(anything a framework prints goes to stderr instead):

* ``{"cmd": "build", "model", "batch_size", "steps", "dtype", "threads", "seed"}``: the backend's ``Model`` from the
  spec and the harness's canonical initial weights, and ``steps`` batches of the harness's own data and batch order,
  stacked in memory as the harness stacks them and staged on the model's device as ``harness.timing.stage`` stages
  them (untimed) -> ``{"ok": true, "version", "build_s", "data_on_device"}``, ``{"skip": reason}`` (framework
  missing, configuration unsupported) or ``{"error": traceback}``;
* ``{"cmd": "round"}``: ``harness.timing.timed_call``: ``model.train_steps(xs, ys)`` between two ``model.sync()``,
  the call ``harness.timing.time_steps`` times -> ``{"ok": true, "worker_s": seconds measured here, "finite": bool}``
  (finite: the first weight tensor after the round);
* ``{"cmd": "quit"}``.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> int:
    backend = sys.argv[1]
    from harness.sweep import reply_channel

    reply = reply_channel()  # JSON lines on the original stdout; a framework's chatter goes to stderr
    import numpy as np

    import backends
    from backends.base import BuildOptions, Unsupported
    from harness import runner, timing
    from harness.worker import stack_batches
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
                xs, ys = stack_batches(job.data, job.order(cmd["batch_size"]), 0, cmd["steps"], spec.dtype,
                                       spec.loss.integer_labels)  # (steps, B, *input_shape): harness.worker's own
                t = time.perf_counter()
                try:
                    model = mod.Model(spec, init_weights(get_model(cmd["model"]), cmd["seed"]),
                                      BuildOptions(dtype=spec.dtype, threads=cmd.get("threads")))
                    model.sync()
                except Unsupported as e:
                    reply({"skip": f"{backend}: {e}"})
                    continue
                build_s = time.perf_counter() - t
                xs, ys, staged = timing.stage(model, xs, ys)  # as harness/timing.time_steps stages them, untimed
                reply({"ok": True, "version": version, "build_s": build_s, "data_on_device": staged})
            elif cmd["cmd"] == "round":
                seconds = timing.timed_call(model, xs, ys)  # the call harness/timing.time_steps times
                reply({"ok": True, "worker_s": seconds, "finite": bool(np.all(np.isfinite(model.get_weights()[0])))})
            else:
                reply({"error": f"unknown command {cmd['cmd']!r}"})
        except Exception:
            reply({"error": traceback.format_exc()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
