"""The agreement engine: compares a backend's run with the NumPy float64 oracle, tensor by tensor, step by step.

A fixed tolerance table cannot hold: the noise of a correct float32 run depends on the seed, the step and the element
(a gradient that is a cancelling sum near zero, a ReLU that switches), and it grows along a chaotic trajectory.  So
the bound of every check is measured in the same run, by the **rounding envelope**:

* the oracle is run again *in the backend's dtype* in a few variants that differ from it only in rounding (the plain
  code; matmuls summed in two blocks and Adam in torch's order; the batch reversed and the other softmax/sigmoid
  formula; each with Monte Carlo arithmetic on every matmul and Adam moment: ``runner.variants_for``,
  ``backends.numpy_scratch.ROUNDING_VARIANTS``);
* every distance is measured in **rounding units of each element**, ``|a - b| / (eps(dtype) * max(|b|, floor))``, where
  the floor is a fraction of the largest magnitude of the *whole* set observed at that step (all gradients, all weights,
  the loss, the predictions; for weights at least one learning rate) and never below the dtype's smallest normal
  number: a tensor that is a cancelling sum near zero (an output bias, a dead layer, a gradient of 1e-312 in float64)
  cannot turn rounding into a failure, and an element that is off by more than its own rounding is still seen;
* for every check (quantity, step, tensor) the envelope is the largest such distance of a variant to the float64
  oracle: what a correct implementation in that dtype computes there;
* after step 1, where a ReLU or max-pool window that switches in one correct run and not in another moves single
  elements by orders of magnitude more than rounding, the envelope of a check is pooled over the tensors of its
  quantity and the late steps so far (``_late_envelope``), and in float32 a coarser "switch" probe, which takes those
  switches, widens the late gradients, weights and final predictions (``is_switch_probe``); a gradient after step 0 that
  leaves the trajectory's envelope is judged again at the run's own weights (``local_gradient_checks``);
* a backend passes a check when its distance is at most ``multiple(step) * envelope + floor_ulps``.

The multiples and the floor live in ``harness/tolerances.py`` with the measurements that justify them
(``results/calibration.md``, written by ``harness calibrate``).  Every check keeps its scaled error
``max|a-b| / max(max|a|, max|b|)`` for the tables; the verdict is the bound.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

import numpy as np

from .status import Status
from .tolerances import policy

Key = tuple[str, int, str]  # (quantity, step, tensor)
EARLY = 10  # "within the first steps": planted bugs must be caught by this step (harness selftest)
SET_FRACTION = 1e-3  # an element's rounding unit is never measured from less than this fraction of the set's scale


@dataclass
class Check:
    quantity: str  # loss | grads | weights | pred | invariance/grads | invariance/pred
    step: int  # updates applied before the observation (0 = initial weights)
    tensor: str  # parameter name, "loss", "probe"
    error: float  # scaled error max|a-b| / max(max|a|, max|b|) (for the tables)
    max_abs: float  # max|a-b|
    ulps: float  # the verdict's measure: max over elements of |a-b| in rounding units of the element (see units())
    bound: float | None  # multiple(step) * envelope + floor, in the same units; None: not compared
    envelope: float | None  # the rounding envelope at this check (largest variant distance to the oracle), in units
    why: str = ""

    @property
    def ok(self) -> bool | None:
        if self.bound is None:
            return None
        return bool(self.ulps <= self.bound)

    @property
    def ratio(self) -> float:
        """The error in units of the bound (> 1 fails)."""
        if self.bound is None or self.ulps == 0.0:
            return 0.0
        return self.ulps / self.bound if self.bound > 0 else float("inf")

    def as_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok, "ratio": self.ratio}


def scaled_error(a, b, floor: float = 0.0) -> tuple[float, float]:
    """``max|a-b| / max(max|a|, max|b|, floor)`` and ``max|a-b|``; inf for a shape mismatch or a NaN/Inf."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if a.shape != b.shape:
        return float("inf"), float("inf")
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        return float("inf"), float("inf")
    diff = float(np.max(np.abs(a - b))) if a.size else 0.0
    scale = max(float(np.max(np.abs(a))) if a.size else 0.0, float(np.max(np.abs(b))) if b.size else 0.0, floor)
    if diff == 0.0:
        return 0.0, 0.0
    return diff / scale, diff


def _max_abs(a) -> float:
    a = np.asarray(a, np.float64)
    return float(np.max(np.abs(a))) if a.size else 0.0


def _indexed(arrays: dict, prefix: str) -> dict[int, list[np.ndarray]]:
    """{step: [tensor_0, tensor_1, ...]} from keys like 'grads/10/3'."""
    out: dict[int, dict[int, np.ndarray]] = {}
    pat = re.compile(rf"^{prefix}/(\d+)/(\d+)$")
    for k, v in arrays.items():
        m = pat.match(k)
        if m:
            out.setdefault(int(m.group(1)), {})[int(m.group(2))] = v
    return {s: [d[j] for j in sorted(d)] for s, d in out.items()}


def observations(spec, arrays: dict) -> dict[Key, np.ndarray]:
    """Everything a run observed, keyed (quantity, step, tensor): per-step losses, gradients, weights, non-trainable
    state (BatchNorm's moving statistics, compared like the weights), predictions."""
    names = spec.param_names()
    obs: dict[Key, np.ndarray] = {}
    losses = np.asarray(arrays.get("losses", []), np.float64)
    for s, v in enumerate(losses):
        obs[("loss", s, "loss")] = v
    for quantity, tensor_names in (("grads", names), ("weights", names), ("state", spec.state_names())):
        for s, tensors in _indexed(arrays, quantity).items():
            for j, t in enumerate(tensors):
                obs[(quantity, s, tensor_names[j])] = t
    if "pred_init" in arrays:
        obs[("pred", 0, "probe")] = arrays["pred_init"]
    if "pred_final" in arrays:
        obs[("pred", len(losses), "probe")] = arrays["pred_final"]
    return obs


def units(a, ref, dtype: str, floor: float) -> float:
    """``max_i |a_i - ref_i| / (eps * max(|ref_i|, floor))``: the distance in rounding units of each element (an ulp,
    within a factor 2), never finer than ``floor`` (a fraction of the whole set's scale): inf for a shape mismatch or
    a NaN/Inf."""
    a = np.asarray(a, np.float64)
    ref = np.asarray(ref, np.float64)
    if a.shape != ref.shape or not (np.all(np.isfinite(a)) and np.all(np.isfinite(ref))):
        return float("inf")
    if not a.size:
        return 0.0
    diff = np.abs(a - ref)
    if not diff.any():
        return 0.0
    # never finer than the dtype's smallest normal number: below it (denormals) a framework that flushes to zero is
    # as right as one that does not (mnist_mlp seed 3 batch 1: a whole gradient set of ~1e-312 against exact zeros)
    info = np.finfo(dtype)
    den = np.maximum(float(info.eps) * np.maximum(np.abs(ref), floor), float(info.tiny))
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        return float(np.max(np.where(diff > 0, diff / den, 0.0)))



@dataclass
class Reference:
    """The float64 oracle's observations of one (seed, batch size) and the rounding envelope of one dtype around it."""

    dtype: str
    obs: dict[Key, np.ndarray]
    envelope: dict[Key, float]  # largest units(variant, oracle) per check (invariance: largest gap of any variant)
    floors: dict[Key, float]  # the smallest magnitude an element's rounding unit is measured from, per check
    variants: list[str] = field(default_factory=list)

    def bound(self, key: Key, factor: float = 1.0) -> tuple[float, float]:
        """(bound, envelope) of one check in rounding units; ``factor`` 2 for a pair of backends."""
        pol = policy(self.dtype)
        env = self.envelope.get(key, 0.0)
        return factor * (pol.multiple(key[1]) * env + pol.floor_ulps), env


def _floors(spec, obs: dict[Key, np.ndarray]) -> dict[Key, float]:
    """Per check, the magnitude below which an element's rounding unit stops shrinking: a fraction of the whole set's
    largest magnitude at that step (all gradients, all weights, the loss, the predictions), and for weights at least
    one learning rate (one optimizer step).  A gradient of 1e-312 against an exact 0 is then no failure, and a bias
    passing through zero is measured against the size of its updates."""
    scale: dict[tuple[str, int], float] = {}
    for (q, s, _), v in obs.items():
        scale[(q, s)] = max(scale.get((q, s), 0.0), _max_abs(v))
    frac = SET_FRACTION
    out = {}
    for (q, s, t) in obs:
        f = frac * scale[(q, s)]
        out[(q, s, t)] = max(f, float(spec.optimizer.lr)) if q == "weights" else f
    for name in spec.param_names():
        out[("invariance/grads", 0, name)] = frac * scale.get(("grads", 0), 0.0)
    out[("invariance/pred", 0, "probe")] = frac * scale.get(("pred", 0), 0.0)
    return out


def build_reference(spec, dtype: str, oracle: dict, variants: dict[str, dict]) -> Reference:
    """The envelope of ``variants`` (name -> arrays of the oracle run in ``dtype`` with that rounding variant) around
    the float64 ``oracle`` arrays.  A variant that diverged or lacks a check contributes nothing there."""
    obs = observations(spec, oracle)
    floors = _floors(spec, obs)
    pol = policy(dtype)
    env: dict[Key, float] = {k: 0.0 for k in obs}
    for name, arrays in variants.items():
        vobs = observations(spec, arrays)
        probe = is_switch_probe(name)
        for k, ref in obs.items():
            if k in vobs and (not probe or (k[0] in SWITCH_QUANTITIES and pol.late(k[1]))):
                d = units(vobs[k], ref, dtype, floors[k])
                if np.isfinite(d):
                    env[k] = max(env[k], d)
    env = _late_envelope(env, pol)
    for arrays in [oracle, *(a for n, a in variants.items() if not is_switch_probe(n))]:
        for k, d in invariance_units(spec, arrays, dtype, floors).items():
            if np.isfinite(d):
                env[k] = max(env.get(k, 0.0), d)
    return Reference(dtype, obs, env, floors, sorted(variants))


SWITCH_QUANTITIES = ("grads", "weights", "state", "pred")


def is_switch_probe(variant: str) -> bool:
    """The float32 switch probe (``backends.numpy_scratch``: Monte Carlo arithmetic at 64 ulps).

    Past step 1 a float32 ReLU / max-pool trajectory either has taken a switch or not, and the two differ by three
    orders of magnitude in single elements of the gradients and weights (MNIST CNN, seed 1, batch 100: no one-ulp
    variant switched, their pooled late gradient envelope was 2e3 units, and TF1's correct run sat at 5.5e6 at step 10
    after a switch).  A few one-ulp variants miss every switch in some runs; the probe takes them, so that the late
    envelope of gradients, weights and the final predictions (a function of those weights: TF1 at seed 36, batch 1,
    sat at 300x the one-ulp variants' spread there) covers a switched trajectory.  It bounds nothing else: not steps 0
    and 1, where the bugs that show at once are caught, and not the loss, in which the bugs that take several steps to
    show (a learning-rate decay, stale Adam state) are caught: the loss keeps the one-ulp variants' envelope and the
    late multiple."""
    return "switch" in variant.split("+")


def _late_envelope(env: dict[Key, float], pol) -> dict[Key, float]:
    """The envelope at a late step: the largest distance any variant showed in any tensor of that quantity at any late
    step so far.  Early steps (0 and 1, before any switch can act) keep their own, per tensor.

    Past the first ReLU / max-pool switch a float32 trajectory is a chain of discrete events, and the distance of one
    correct run to the oracle at one check is one draw from a heavy-tailed distribution: which step and which tensor
    a switch hits is itself random.  Per check, a handful of variants is too small a sample: the MNIST CNN float32 at
    seed 17, batch 100 had variant loss distances of 0.06 to 1.8 units at step 5 (and 233 at step 10), and JAX's 268
    at step 5; another draw of the Monte Carlo variants' random numbers moved one step-10 conv gradient envelope 100x
    (seed 1).  So the late envelope pools the sample over the tensors of a quantity and over the late steps so far:
    runs that have parted do not come back together (the variants' weight envelope grows from 2e3 units after step 1
    to 2e6 after step 12), and which tensor shows it first is chance.  Units are per element, with the floor tied to
    the whole set, so tensors of one quantity are measured alike."""
    out = dict(env)
    running: dict[str, float] = {}
    for s in sorted({k[1] for k in env}):
        if not pol.late(s):
            continue
        here = [k for k in env if k[1] == s]
        for q in {k[0] for k in here}:
            running[q] = max(running.get(q, 0.0), *(env[k] for k in here if k[0] == q))
        for k in here:
            out[k] = running[k[0]]
    return out


def invariance_units(spec, arrays: dict, dtype: str, floors: dict[Key, float]) -> dict[Key, float]:
    """Batch-size invariance within one run, at the initial weights, on a few samples (``harness.worker``): per-sample
    gradients reduced per the spec vs their batch's gradient, and batch-1 predictions vs the rows of the batch
    prediction, in rounding units."""
    out: dict[Key, float] = {}
    for j, name in enumerate(spec.param_names()):
        if f"inv_grad/{j}" in arrays and f"inv_batch_grad/{j}" in arrays:
            key = ("invariance/grads", 0, name)
            out[key] = units(arrays[f"inv_grad/{j}"], arrays[f"inv_batch_grad/{j}"], dtype, floors[key])
    if "inv_pred_rows" in arrays and "pred_init" in arrays:
        rows = arrays["inv_pred_rows"]
        key = ("invariance/pred", 0, "probe")
        out[key] = units(rows, arrays["pred_init"][: len(rows)], dtype, floors[key])
    return out


def _check(ref: Reference, key: Key, a, b, factor: float, weight_floor: float) -> Check:
    err, mabs = scaled_error(a, b, weight_floor if key[0] == "weights" else 0.0)  # max|a-b| needs no floor
    bound, env = ref.bound(key, factor)
    return Check(key[0], key[1], key[2], err, mabs, units(a, b, ref.dtype, ref.floors[key]), bound, env)


def compare_runs(spec, ref: Reference, row: dict, other: dict | None = None) -> list[Check]:
    """Checks of ``row`` (the arrays a worker run wrote) against the oracle of ``ref`` -- or, with ``other``, against
    another backend's run (a pair: each may sit anywhere in its own bound, so the bound counts twice)."""
    factor = 1.0 if other is None else 2.0
    target = ref.obs if other is None else observations(spec, other)
    mine = observations(spec, row)
    wfloor = float(spec.optimizer.lr)  # weights' scaled error (display only) never below one learning rate
    checks = [_check(ref, k, mine[k], target[k], factor, wfloor) for k in target if k in mine and k in ref.obs]
    n_row = len(np.asarray(row.get("losses", [])))
    n_ref = sum(1 for k in target if k[0] == "loss")
    if n_row != n_ref:
        checks.append(Check("loss", min(n_row, n_ref), "steps", float("inf"), float("inf"), float("inf"), 0.0, None,
                            f"ran {n_row} steps, reference ran {n_ref}"))
    checks.sort(key=lambda c: c.step)
    return checks


def local_gradient_checks(spec, dtype: str, row: dict, batches: dict[int, tuple], variants: list[str],
                          seed: int = 0) -> list[Check]:
    """Gradients after step 0 checked where they were computed: at the run's own weights.

    A gradient at step s >= 1 is evaluated at weights that have already parted from the oracle's: Adam's first step
    moves every weight whose gradient is near zero by up to a learning rate on the sign of its rounding, and from there
    ReLU and max-pool switches follow (MNIST CNN float32: torch at seed 45, batch 100, step 1, conv2 kernel 20x the
    variants' trajectory envelope; TF1 at seed 36, batch 1, step 10, 5% of the tensor's largest gradient).  No
    trajectory envelope bounds that and still sees anything.  So where a run's gradient at a step leaves the trajectory's
    envelope and the run recorded its weights there too (steps 1 and 10 by default), the float64 oracle and its rounding
    variants in ``dtype`` are evaluated at *that run's* weights on that step's batch (``batches``: step -> (x, y)), and
    the run's gradient must lie within the early multiple of those variants' spread: the gradient function itself is
    checked, trajectory or not (``runner.judge``).  The trajectory is still checked by the weights and the loss."""
    import backends.numpy_scratch as numpy_oracle
    from backends.base import BuildOptions

    pol = policy(dtype)
    names = spec.param_names()
    weights, grads = _indexed(row, "weights"), _indexed(row, "grads")
    checks = []
    for s in sorted(set(weights) & set(grads) & set(batches)):
        if s < 1 or len(weights[s]) != len(names) or len(grads[s]) != len(names):
            continue
        w = [np.asarray(a, np.float64) for a in weights[s]]
        if not all(np.all(np.isfinite(a)) for a in w):
            continue
        x, y = batches[s]

        def at_step_s(options, w=w, s=s):  # the oracle at this run's weights, as of step s (its dropout masks)
            m = numpy_oracle.Model(spec, w, options)
            m.t = s
            return m

        _, g64 = at_step_s(BuildOptions(dtype="float64", seed=seed)).gradients(np.asarray(x, np.float64), y)
        floor = SET_FRACTION * max(_max_abs(g) for g in g64)
        env = [0.0] * len(names)
        xd = np.asarray(x, dtype)
        yd = y if spec.loss.integer_labels else np.asarray(y, dtype)
        for v in variants:
            m = at_step_s(BuildOptions(dtype=dtype, seed=seed, extra={"rounding": "" if v == "plain" else v}))
            for j, g in enumerate(m.gradients(xd, yd)[1]):
                d = units(g, g64[j], dtype, floor)
                if np.isfinite(d):
                    env[j] = max(env[j], d)
        for j, name in enumerate(names):
            err, mabs = scaled_error(grads[s][j], g64[j])
            bound = pol.early_multiple * env[j] + pol.floor_ulps
            checks.append(Check("grads", s, name, err, mabs, units(grads[s][j], g64[j], dtype, floor), bound, env[j],
                                "at this run's own weights"))
    return checks


def first_update_checks(spec, ref: Reference, row: dict, init: list[np.ndarray]) -> list[Check]:
    """The weights after step 1 judged as the spec's first update of a gradient that the step-0 check allows.

    The step-0 gradient check lets each element of a correct run's gradient sit within its bound of the oracle's:
    ``delta = bound * eps * max(|g|, floor)``.  Where that interval straddles zero, Adam's first update (after bias
    correction ``lr * g / (|g| + eps')``: a sign, for any ``|g|`` well above its epsilon) may go either way, and a
    correct run lands up to two learning rates from the oracle: MNIST's BatchNorm CNN in float32, seed 38, batch 100,
    where the float32 gradients of the first conv kernel are off by up to 5e-3 in every implementation (the BatchNorm
    backward cancels), and torch's element (1, 2, 0, 6) had the other sign (oracle -1.5e-4, torch +2.9e-4) while the
    oracle's float32 variants, whose error there is the same in all of them, did not flip one.  So each element of the
    step-1 weights may also move as far as the spec's first update of any gradient inside that interval moves it (the
    update is monotonic in each element: the interval's ends bound it), and only the excess is measured against the
    step's bound.  A planted bug in the update itself (epsilon, learning rate, weight decay, a frozen tensor) still
    fails wherever the gradient is clear of zero; ``runner.judge`` calls this only for step-1 weights that fail."""
    import backends.numpy_scratch as numpy_oracle
    from backends.base import BuildOptions

    names = spec.param_names()
    weights = _indexed(row, "weights").get(1)
    grads = [ref.obs.get(("grads", 0, n)) for n in names]
    if weights is None or len(weights) != len(names) or any(g is None for g in grads):
        return []
    eps = float(np.finfo(ref.dtype).eps)
    delta = []
    for name, g in zip(names, grads):
        key = ("grads", 0, name)
        delta.append(ref.bound(key)[0] * eps * np.maximum(np.abs(g), ref.floors[key]))

    def first_update(gs):
        m = numpy_oracle.Model(spec, [np.asarray(w, np.float64) for w in init], BuildOptions(dtype="float64"))
        m._apply([np.asarray(g, np.float64) for g in gs])
        return m.get_weights()

    mid = first_update(grads)
    lo = first_update([g - d for g, d in zip(grads, delta)])
    hi = first_update([g + d for g, d in zip(grads, delta)])
    checks = []
    for j, name in enumerate(names):
        key = ("weights", 1, name)
        if key not in ref.obs:
            continue
        target = ref.obs[key]
        allowed = np.maximum(np.abs(lo[j] - mid[j]), np.abs(hi[j] - mid[j]))
        diff = np.asarray(weights[j], np.float64) - target
        excess = np.sign(diff) * np.maximum(np.abs(diff) - allowed, 0.0)
        bound, env = ref.bound(key)
        err, mabs = scaled_error(weights[j], target, float(spec.optimizer.lr))
        checks.append(Check("weights", 1, name, err, mabs, units(target + excess, target, ref.dtype, ref.floors[key]),
                            bound, env, "as the first update of a gradient within its step-0 bound"))
    return checks


def invariance_checks(spec, ref: Reference, row: dict) -> list[Check]:
    """The row's own batch-size invariance gaps, bounded by the gaps of the oracle and its variants."""
    checks = []
    for key, u in invariance_units(spec, row, ref.dtype, ref.floors).items():
        bound, env = ref.bound(key)
        q = "inv_grad" if key[0] == "invariance/grads" else "inv_pred_rows"
        j = spec.param_names().index(key[2]) if q == "inv_grad" else None
        a = row[f"inv_grad/{j}"] if j is not None else row["inv_pred_rows"]
        b = row[f"inv_batch_grad/{j}"] if j is not None else row["pred_init"][: len(a)]
        err, mabs = scaled_error(a, b)
        checks.append(Check(key[0], 0, key[2], err, mabs, u, bound, env))
    return checks


def first_nonfinite(spec, row: dict) -> str | None:
    """'diverged at step k (tensor ...)' for the first NaN/Inf in the losses or weights, else None."""
    losses = np.asarray(row.get("losses", []))
    bad = np.flatnonzero(~np.isfinite(losses))
    if bad.size:
        return f"diverged at step {int(bad[0])} (tensor loss = {losses[bad[0]]})"
    for quantity, names in (("weights", spec.param_names()), ("state", spec.state_names())):
        for s, tensors in sorted(_indexed(row, quantity).items()):
            for j, w in enumerate(tensors):
                if not np.all(np.isfinite(w)):
                    return f"diverged by step {s} (tensor {names[j]})"
    return None


def summarize(checks: list[Check]) -> dict:
    """Status, first failure, the worst scaled error per quantity and the worst error in units of its bound."""
    failed = [c for c in checks if c.ok is False]
    worst: dict[str, float] = {}
    worst_ratio: dict[str, float] = {}
    for c in checks:
        if c.bound is not None:
            worst[c.quantity] = max(worst.get(c.quantity, 0.0), c.error)
            worst_ratio[c.quantity] = max(worst_ratio.get(c.quantity, 0.0), c.ratio)
    first = min(failed, key=lambda c: (c.step, -c.ratio)) if failed else None
    return {
        "status": Status.FAIL if failed else Status.PASS,
        "n_checks": sum(c.bound is not None for c in checks),
        "n_failed": len(failed),
        "worst": worst,
        "worst_ratio": worst_ratio,
        # the largest error in units of its bound over the first EARLY steps (what a planted bug must exceed)
        "worst_ratio_early": max((c.ratio for c in checks if c.bound is not None and c.step <= EARLY), default=0.0),
        "first_failure": first.as_dict() if first else None,
    }


def describe_failure(f: dict) -> str:
    what = f["quantity"] if f["tensor"] == f["quantity"] or f["tensor"] == "loss" else f"{f['quantity']} {f['tensor']}"
    if f["bound"] == 0.0 or f["envelope"] is None:
        return f"first exceeds at step {f['step']}: {what}: {f['why'] or 'mismatch'}"
    return (f"first exceeds at step {f['step']}: {what} off by {f['max_abs']:.2e} = {f['ulps']:.3g} rounding units, "
            f"{f['ratio']:.3g}x its bound {f['bound']:.3g} (the variants' envelope: {f['envelope']:.3g}; "
            f"scaled error {f['error']:.1e})")
