"""The torch and JAX backends: end to end through the harness, and in-process checks of what the harness cannot see.

* Through ``harness.runner.compare`` (one subprocess per backend, the NumPy float64 oracle): every row passes for the
  four models in float64 and float32 (few steps for the MNIST models to keep the file short).
* torch's layout edge: canonical -> torch -> canonical is exact, and the flatten row permutation is really needed.
* Fixed-weight golden forward examples (integers: exact in float32) through torch and JAX in this process.
* JAX fast mode (``lax.scan``) equals the loop; max-pooling routes ties to the first maximum, like the oracle.
* Aligned optimizers in this process: every built-in (``torch.optim.SGD`` / ``Adam``, ``optax.sgd`` / ``adam``) on a
  spec it follows exactly (Adam with the ``eps_v_hat`` convention) and the hand-written eps_hat Adam, against the
  oracle over 12 steps of real data, per step, in float64 (1e-12) and float32; ``info["optimizer"]`` names which ran.

JAX in this process runs float32 only unless ``JAX_ENABLE_X64`` was set before it was imported; float64 JAX is covered
through the harness, which sets it in the backend's subprocess, and in one subprocess of its own (``JAX_ENABLE_X64=1``)
for the optimizer checks.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import backends.numpy_scratch as ref
from backends.base import BuildOptions, Unsupported
from models import get_model, init_weights
from models.spec import SGD, Dense, Init, Loss, MaxPool2D, ModelSpec
from tests import lockstep
from tests.lockstep import with_convention

BACKENDS = ("torch", "jax")
MODULE = {"torch": "backends.torch_eager", "jax": "backends.jax_jit"}


def _load(backend: str):
    pytest.importorskip(backend)
    import importlib

    return importlib.import_module(MODULE[backend])


def scaled_error(a, b, floor: float = 1e-300) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = max(np.max(np.abs(a)), np.max(np.abs(b)), floor)
    return float(np.max(np.abs(a - b)) / scale)


# -------------------------------------------------------------------------------------- end to end, through harness
# steps: 20 (the default) for the small models; past step 10 for the MNIST MLP; 2 for the CNN (init + 1-step checks)
# at batch sizes 1 and 10 (the oracle's float64 CNN at batch 100, with its 100 per-sample gradients, takes ~13 s; the
# CLI runs cover batch 100)
HARNESS_CASES = [("mlp_431", 20, None), ("pima_mlp", 20, None), ("mnist_mlp", 11, None), ("mnist_cnn", 2, [1, 10])]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("model,steps,batch_sizes", HARNESS_CASES, ids=[c[0] for c in HARNESS_CASES])
@pytest.mark.parametrize("backend", BACKENDS)
def test_harness_rows_pass(backend, model, steps, batch_sizes, dtype):
    pytest.importorskip(backend)
    from harness.runner import CompareConfig, compare

    result = compare(CompareConfig(model=model, backends=[backend], steps=steps, dtype=dtype, timing=False,
                                   batch_sizes=batch_sizes))
    rows = result["rows"]
    assert rows, "no rows"
    for row in rows:
        assert row["status"] == "pass", (
            f"{backend} {model} {dtype} batch {row['batch_size']}: {row['status']}: {row.get('reason')}\n"
            f"{row.get('meta', {}).get('traceback', '') if isinstance(row.get('meta'), dict) else ''}")
        assert row["agreement"]["n_checks"] > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_harness_fast_mode_passes(backend):
    pytest.importorskip(backend)
    from harness.runner import CompareConfig, compare

    # 11 steps: scan over stacks of 1, 9 and 1 batches (two compilations), weights checked after 1 and 10 steps
    result = compare(CompareConfig(model="pima_mlp", backends=[backend], steps=11, dtype="float64", timing=False,
                                   fast=True))
    assert [r["status"] for r in result["rows"]] == ["pass", "pass"], [r.get("reason") for r in result["rows"]]


# ------------------------------------------------------------------------------------------- torch's layout edge
@pytest.mark.parametrize("model", ["mlp_431", "pima_mlp", "mnist_mlp", "mnist_cnn"])
def test_torch_layout_round_trip_is_exact(model):
    tb = _load("torch")
    spec = get_model(model)
    w = init_weights(spec, 3)
    plan = tb.layout_plan(spec)
    back = tb.from_torch_layout(plan, tb.to_torch_layout(plan, w))
    assert all(np.array_equal(a, b) for a, b in zip(w, back))
    m = tb.Model(spec, w, BuildOptions(dtype="float64"))
    assert all(np.array_equal(a, b) for a, b in zip(w, m.get_weights()))
    # get_weights hands out copies: a step must not change what was returned before it
    before = m.get_weights()
    snapshot = [b.copy() for b in before]
    x = np.random.default_rng(0).random((2,) + tuple(spec.input_shape))
    y = np.zeros(2, np.int64) if spec.loss.integer_labels else np.zeros((2, spec.n_outputs))
    m.train_step(x, y)
    assert all(np.array_equal(a, b) for a, b in zip(before, snapshot))


def test_torch_layout_plan_of_the_cnn():
    tb = _load("torch")
    plan = tb.layout_plan(get_model("mnist_cnn"))
    assert [p.kind for p in plan] == ["conv", "bias", "conv", "bias", "dense", "bias", "dense", "bias"]
    assert plan[0].torch == (32, 1, 3, 3) and plan[2].torch == (64, 32, 3, 3)
    assert plan[4].rows is not None and plan[6].rows is None  # only the first dense after the flatten
    assert plan[4].torch == (128, 1600)
    assert list(plan[4].rows[:3]) == [0, 64, 128]  # torch feature (c=0,h=0,w=0), (0,0,1), (0,0,2) in (h,w,c) order


def test_torch_flatten_permutation_is_needed():
    """The CNN up to its first dense layer: equal to the oracle with the row permutation, far off without it."""
    tb = _load("torch")
    import torch

    spec = get_model("mnist_cnn")
    layers = spec.layers[:6]
    assert isinstance(layers[-1], Dense)
    trunc = spec.with_overrides(layers=layers[:-1] + (Dense(layers[-1].units, "linear"),))
    w = init_weights(spec, 0)[:6]
    x = np.random.default_rng(1).random((3,) + tuple(spec.input_shape))
    want, _ = ref.forward(np, trunc, w, x)

    def torch_out(plan):
        net = tb.build_module(trunc).double()
        with torch.no_grad():
            for p, a in zip(net.parameters(), tb.to_torch_layout(plan, w), strict=True):
                p.copy_(torch.from_numpy(a))
            return net(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()

    plan = tb.layout_plan(trunc)
    assert scaled_error(torch_out(plan), want) < 1e-13
    no_perm = [dataclasses.replace(p, rows=None) for p in plan]
    assert scaled_error(torch_out(no_perm), want) > 1e-2


def test_torch_cnn_gradients_match_oracle_and_change_nothing():
    tb = _load("torch")
    spec = get_model("mnist_cnn")
    w = init_weights(spec, 0)
    rng = np.random.default_rng(2)
    x = rng.random((4,) + tuple(spec.input_shape))
    y = rng.integers(0, 10, 4)
    m = tb.Model(spec, w, BuildOptions(dtype="float64"))
    o = ref.Model(spec, w, BuildOptions(dtype="float64"))
    loss, grads = m.gradients(x, y)
    loss_ref, grads_ref = o.gradients(x, y)
    assert abs(loss - loss_ref) <= 1e-13 * abs(loss_ref)
    for g, gr in zip(grads, grads_ref, strict=True):
        assert g.shape == gr.shape and scaled_error(g, gr) < 1e-12
    # gradients() changed neither weights nor optimizer state: the next step equals the oracle's first step
    assert all(np.array_equal(a, b) for a, b in zip(w, m.get_weights()))
    assert m.train_step(x, y) == pytest.approx(loss_ref, rel=1e-13)
    o.train_step(x, y)
    for a, b in zip(m.get_weights(), o.get_weights()):
        assert scaled_error(a, b) < 1e-12


@pytest.mark.parametrize("convention", ["eps_hat", "eps_v_hat"])
def test_torch_optim_adam_with_per_step_eps_reproduces_the_spec(convention):
    """extra['adam']: the hand-written update forced ('manual') and torch.optim.Adam ('torch_optim': for eps_hat the
    numerics guide's trick, eps = eps/sqrt(1-b2^t) each step; for eps_v_hat the plain built-in, also the default)."""
    tb = _load("torch")
    spec = with_convention("pima_mlp", convention)
    w = init_weights(spec, 0)
    rng = np.random.default_rng(3)
    xs, ys = rng.normal(size=(30, 10, 8)) * 3, (rng.random((30, 10, 1)) > 0.5).astype(np.float64)
    o = ref.Model(spec, w, BuildOptions(dtype="float64"))
    want = o.train_steps(xs, ys)
    for impl in ("manual", "torch_optim"):
        m = tb.Model(spec, w, BuildOptions(dtype="float64", extra={"adam": impl}))
        assert m.info["optimizer"].startswith("hand-written" if impl == "manual" else "built-in torch.optim.Adam")
        assert scaled_error(m.train_steps(xs, ys), want) < 1e-14
        for a, b in zip(m.get_weights(), o.get_weights()):
            assert scaled_error(a, b) < 1e-13, impl


def test_torch_native_mode_records_differences():
    tb = _load("torch")
    spec = get_model("pima_mlp")
    w = init_weights(spec, 0)
    x = np.random.default_rng(4).normal(size=(5, 8))
    native = tb.Model(spec, w, BuildOptions(dtype="float64", mode="native"))
    aligned = tb.Model(spec, w, BuildOptions(dtype="float64"))
    diffs = " ".join(native.info["native_differences"])
    assert "BCELoss" in diffs and "eps=1e-08" in diffs
    assert scaled_error(native.predict(x), aligned.predict(x)) < 1e-15  # the sigmoid is applied once, not twice


# ------------------------------------------------------------------------- aligned optimizers against the oracle
def optimizer_vs_oracle(backend: str, model: str, convention: str | None, dtype: str, steps: int = 12) -> dict:
    """``tests.lockstep.optimizer_vs_oracle`` by names (the JAX float64 cases call it from a subprocess)."""
    return lockstep.optimizer_vs_oracle(_load(backend), with_convention(model, convention), dtype, steps)


# (backend, model, Adam convention or None for the spec's SGD, what info["optimizer"] starts with): each built-in on
# the convention it follows exactly, and the hand-written Adam for the one it cannot
OPTIMIZER_CASES = [
    ("torch", "pima_mlp", "eps_v_hat", "built-in torch.optim.Adam"),
    ("torch", "mnist_mlp", "eps_v_hat", "built-in torch.optim.Adam"),
    ("torch", "pima_mlp", "eps_hat", "hand-written, spec convention (eps_hat)"),
    ("torch", "mlp_431", None, "built-in torch.optim.SGD"),
    ("jax", "pima_mlp", "eps_v_hat", "built-in optax.adam"),
    ("jax", "mnist_mlp", "eps_v_hat", "built-in optax.adam"),
    ("jax", "pima_mlp", "eps_hat", "hand-written, spec convention (eps_hat)"),
    ("jax", "mlp_431", None, "built-in optax.sgd"),
]
# measured over the 12 steps (this machine): float64 <= 7.1e-13 (optax.adam on the MNIST MLP, as the hand-written
# eps_v_hat update before it: float64 gradients that differ from the oracle's by ulps, at elements |g| ~ eps = 1e-8
# where eps_v_hat's g/(|g| + eps) is steepest; every other case <= 4e-14); float32 (vs the float64 oracle) <= 8.0e-7
OPTIMIZER_TOL = {"float64": 1e-12, "float32": 1e-5}


@pytest.fixture(scope="module")
def jax_float64_optimizers() -> dict:
    """``optimizer_vs_oracle`` of the JAX cases in float64, from one subprocess with ``JAX_ENABLE_X64=1`` (it must be
    set before JAX is imported; in this process JAX may be float32-only)."""
    _load("jax")
    pytest.importorskip("optax")
    cases = [c[:3] for c in OPTIMIZER_CASES if c[0] == "jax"]
    calls = [(*c, "float64") for c in cases]
    env = {**os.environ, "JAX_ENABLE_X64": "1"}
    code = ("import json, sys; sys.path.insert(0, 'tests'); import test_backend_torch_jax as t; "
            f"print('RESULT ' + json.dumps([t.optimizer_vs_oracle(*c) for c in {calls!r}]))")
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    return dict(zip(cases, json.loads(lines[-1][len("RESULT "):]), strict=True))


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("backend,model,convention,expected", OPTIMIZER_CASES,
                         ids=[f"{c[0]}-{c[1]}-{c[2] or 'sgd'}" for c in OPTIMIZER_CASES])
def test_aligned_optimizer_matches_oracle(backend, model, convention, expected, dtype, request):
    mod = _load(backend)
    if backend == "jax":
        pytest.importorskip("optax")
    if backend == "jax" and dtype == "float64" and not mod.x64_enabled():
        out = request.getfixturevalue("jax_float64_optimizers")[(backend, model, convention)]
    else:
        out = optimizer_vs_oracle(backend, model, convention, dtype)
    assert out["steps"] == 12
    assert out["optimizer"].startswith(expected), out
    assert out["worst"] < OPTIMIZER_TOL[dtype], out


def test_torch_adam_choice_in_cuda_graph_mode():
    """CUDA-graph fast mode keeps the hand-written Adam for eps_v_hat too (capturable=True: float32 bias corrections);
    the choice is made on the host, so it is checked here on a CPU model told it captures."""
    tb = _load("torch")
    spec = with_convention("pima_mlp", "eps_v_hat")
    m = tb.Model(spec, init_weights(spec, 0), BuildOptions(dtype="float64"))
    assert (m.adam_impl, m.info["optimizer"]) == ("torch_optim", "built-in torch.optim.Adam")
    m.fast_graph = True
    impl, why = m._adam_choice(spec.optimizer, "auto")
    assert impl == "manual" and why.startswith("hand-written, spec convention (eps_v_hat)") and "float32" in why
    for convention in ("eps_hat", "eps_v_hat"):
        with pytest.raises(Unsupported):
            m._adam_choice(dataclasses.replace(spec.optimizer, convention=convention), "torch_optim")
    with pytest.raises(ValueError, match="extra"):
        m._adam_choice(spec.optimizer, "fused")


# ----------------------------------------------------------------------------------------- golden forward examples
def _golden(hidden: str, k1, k2) -> tuple[ModelSpec, list[np.ndarray]]:
    spec = ModelSpec(name="golden", description="2-2-1 with fixed integer weights, no biases", input_shape=(2,),
                     layers=(Dense(2, hidden), Dense(1)), loss=Loss("sse", "sum"), optimizer=SGD(0.1),
                     init=Init("zeros", "zeros"), dataset="toy_431", batch_sizes=(1,), epochs=1, expected_params=9)
    return spec, [np.array(k1, float), np.zeros(2), np.array(k2, float), np.zeros(1)]


GOLDEN = [
    # hidden units' weights [1, 1] and [-1, 1] (kernel columns), output [2, -1]: 2*(x1+x2) - (x2-x1)
    ("linear", [[1, -1], [1, 1]], [[2], [-1]], [[2, 3], [3, 4]], [9, 13]),
    # relu: unit 0 = 2*3 + 4*4 = 22, unit 1 = 4*3 - 5*4 = -8 -> 0; output 2*22 + 7*0
    ("relu", [[2, 4], [4, -5]], [[2], [7]], [[3, 4]], [44]),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("hidden,k1,k2,x,want", GOLDEN, ids=["linear", "relu"])
def test_golden_forward(backend, hidden, k1, k2, x, want):
    mod = _load(backend)
    spec, w = _golden(hidden, k1, k2)
    assert [a.shape for a in w] == [tuple(s) for s in spec.param_shapes()]
    m = mod.Model(spec, w, BuildOptions(dtype="float32"))
    out = m.predict(np.array(x, np.float32))
    assert out.dtype == np.float32
    assert out[:, 0].tolist() == [float(v) for v in want]  # integers: exact in float32
    assert ref.Model(spec, w, BuildOptions(dtype="float32")).predict(np.array(x, np.float32))[:, 0].tolist() == want


# ---------------------------------------------------------------------------------------------------- JAX in-process
def _batches(spec, k, b, seed=0):
    rng = np.random.default_rng(seed)
    xs = rng.random((k, b) + tuple(spec.input_shape)).astype(np.float32)
    if spec.loss.integer_labels:
        ys = rng.integers(0, spec.n_outputs, (k, b))
    else:
        ys = (rng.random((k, b, spec.n_outputs)) > 0.5).astype(np.float32)
    return xs, ys


@pytest.mark.parametrize("model,convention", [("mlp_431", None), ("pima_mlp", None), ("pima_mlp", "eps_v_hat"),
                                              ("mnist_cnn", None)], ids=["mlp_431", "pima_mlp", "pima_mlp-eps_v_hat",
                                                                         "mnist_cnn"])
def test_jax_fast_scan_equals_loop(model, convention):
    """optax.sgd (mlp_431), the hand-written eps_hat Adam and optax.adam (eps_v_hat): the optimizer state rides in the
    scan's carry."""
    jb = _load("jax")
    spec = with_convention(model, convention)
    w = init_weights(spec, 0)
    xs, ys = _batches(spec, 6, 3)
    loop = jb.Model(spec, w, BuildOptions(dtype="float32"))
    scan = jb.Model(spec, w, BuildOptions(dtype="float32", fast=True))
    l_loop = np.concatenate([loop.train_steps(xs[:1], ys[:1]), loop.train_steps(xs[1:], ys[1:])])
    l_scan = np.concatenate([scan.train_steps(xs[:1], ys[:1]), scan.train_steps(xs[1:], ys[1:])])
    assert scan.info["scan"] is True and loop.info["scan"] is False
    assert scan.info["jit"] is True and scan.info["trace_s"] > 0
    if model == "mnist_cnn":
        # XLA compiles the first conv's kernel gradient differently inside the scan's loop body: ulp-level
        # differences (measured: 5e-8 after 1 step, 2.6e-6 after 6 float32 steps; <= 2.4e-15 in float64)
        np.testing.assert_allclose(l_scan, l_loop, rtol=1e-6)
        for a, b in zip(scan.get_weights(), loop.get_weights()):
            assert scaled_error(a, b) < 1e-5
    else:
        np.testing.assert_array_equal(l_scan, l_loop)
        for a, b in zip(scan.get_weights(), loop.get_weights()):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("convention", ["eps_hat", "eps_v_hat"])
def test_jax_matches_oracle_in_float32_in_process(convention):
    jb = _load("jax")
    spec = with_convention("pima_mlp", convention)
    w = init_weights(spec, 0)
    xs, _ = _batches(spec, 5, 10, seed=1)
    # all-positive labels: random 0/1 labels make the output-bias gradient a cancelling sum (~2e-5 from terms ~0.5),
    # whose float32 error is ~7e-4 scaled even for the NumPy backend in float32
    ys = np.ones((5, 10, 1), np.float32)
    m = jb.Model(spec, w, BuildOptions(dtype="float32"))
    o = ref.Model(spec, w, BuildOptions(dtype="float64"))
    loss, grads = m.gradients(xs[0], ys[0])
    loss_ref, grads_ref = o.gradients(xs[0], ys[0])
    assert all(g.dtype == np.float32 for g in grads)
    assert abs(loss - loss_ref) < 1e-6 * abs(loss_ref)
    assert max(scaled_error(a, b) for a, b in zip(grads, grads_ref)) < 1e-5
    assert all(np.array_equal(a, np.float32(b)) for a, b in zip(m.get_weights(), w))  # gradients(): no update
    assert scaled_error(m.train_steps(xs, ys), o.train_steps(xs, ys)) < 1e-5
    assert max(scaled_error(a, b) for a, b in zip(m.get_weights(), o.get_weights())) < 1e-5


def test_jax_float64_without_x64_is_unsupported():
    jb = _load("jax")
    if jb.x64_enabled():
        pytest.skip("JAX_ENABLE_X64 is set in this process")
    spec = get_model("mlp_431")
    with pytest.raises(Unsupported, match="JAX_ENABLE_X64"):
        jb.Model(spec, init_weights(spec, 0), BuildOptions(dtype="float64"))


def test_jax_native_mode_records_differences():
    jb = _load("jax")
    pytest.importorskip("optax")  # native mode only
    spec = get_model("pima_mlp")
    m = jb.Model(spec, init_weights(spec, 0), BuildOptions(dtype="float32", mode="native"))
    diffs = " ".join(m.info["native_differences"])
    assert "optax.adam" in diffs and "already stable" in diffs


# ------------------------------------------------------------------------------------- max-pool routing on ties
def _pool_case():
    # windows with ties in every position pattern; the oracle routes to the first maximum (row-major in the window)
    x = np.array([[3, 3, 1, 3, 2, 2],
                  [3, 1, 3, 3, 2, 2],
                  [0, 5, 4, 1, 7, 7],
                  [5, 5, 4, 4, 7, 1]], np.float32).reshape(1, 4, 6, 1)
    x = np.concatenate([x, x[:, ::-1, ::-1]], axis=-1)  # a second channel with the ties mirrored
    dout = np.arange(1, 1 + 2 * 3 * 2, dtype=np.float32).reshape(1, 2, 3, 2)
    _, idx = ref._pool_forward(np, x, 2)
    want = ref._pool_backward(np, x.shape, 2, idx, dout)
    return x, dout, want


@pytest.mark.parametrize("backend", BACKENDS)
def test_max_pool_routes_ties_to_first_max(backend):
    mod = _load(backend)
    x, dout, want = _pool_case()
    spec = ModelSpec(name="pool", description="max-pool only", input_shape=x.shape[1:], layers=(MaxPool2D(2),),
                     loss=Loss("sse", "sum"), optimizer=SGD(0.1), init=Init(), dataset="toy_431", batch_sizes=(1,),
                     epochs=1, expected_params=0)
    if backend == "jax":
        import jax

        got = jax.grad(lambda a: (mod.forward(spec, [], a) * dout).sum())(x)
    else:
        import torch

        xt = torch.from_numpy(x).permute(0, 3, 1, 2).requires_grad_(True)
        out = mod.build_module(spec)(xt)
        (out * torch.from_numpy(dout).permute(0, 3, 1, 2)).sum().backward()
        got = xt.grad.permute(0, 2, 3, 1)
    np.testing.assert_array_equal(np.asarray(got), want)
