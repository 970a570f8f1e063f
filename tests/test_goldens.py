"""Golden values of framework defaults, re-measured with each framework's own optimizer on one weight (issue 13):
the first update sizes that make "the same optimizer" differ between frameworks.  Each is also expressed as a spec
and reproduced by the NumPy oracle (tests/test_oracle_vocab.py), and the atlas (results/hazards.md) measures what they
do to a trained network.  The numbers are rounded to the figures quoted in the README."""

import numpy as np
import pytest


def sig(x: float, n: int = 3) -> str:
    return f"{x:.{n}g}"


# --- torch ----------------------------------------------------------------------------------------------------------
def _torch_steps(make, grads, lrs=None):
    torch = pytest.importorskip("torch")
    w = torch.nn.Parameter(torch.ones(1, dtype=torch.float64))
    opt = make([w])
    for k, g in enumerate(grads):
        if lrs is not None:
            for group in opt.param_groups:
                group["lr"] = lrs[k]
        w.grad = torch.full((1,), g, dtype=torch.float64)
        opt.step()
    return float(w.detach()[0])


def test_torch_defaults():
    torch = pytest.importorskip("torch")
    assert sig(_torch_steps(lambda p: torch.optim.RMSprop(p, lr=1e-3), [0.1]) - 1) == "-0.01"
    assert sig(_torch_steps(lambda p: torch.optim.Adagrad(p, lr=1e-2), [0.1]) - 1) == "-0.01"
    w = _torch_steps(lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), [1.0] * 4, [0.1, 0.1, 0.01, 0.01])
    assert sig(w) == "0.649"


# --- Keras 3 --------------------------------------------------------------------------------------------------------
def _keras_steps(make, grads, lrs=None):
    keras = pytest.importorskip("keras")
    w = keras.Variable(np.ones(1), dtype="float64")
    opt = make(keras)
    for k, g in enumerate(grads):
        if lrs is not None:
            opt.learning_rate = lrs[k]
        opt.apply_gradients([(keras.ops.convert_to_tensor(np.full(1, g), dtype="float64"), w)])
    return float(np.asarray(w.numpy())[0])


def test_keras_defaults():
    assert sig(_keras_steps(lambda k: k.optimizers.RMSprop(learning_rate=1e-3), [0.1]) - 1) == "-0.00316"
    # 1e-2 * 0.1 / sqrt(0.1 + 0.01) = 3.02e-3: the accumulator starts at 0.1
    assert sig(_keras_steps(lambda k: k.optimizers.Adagrad(learning_rate=1e-2), [0.1]) - 1, 2) == "-0.003"
    w = _keras_steps(lambda k: k.optimizers.SGD(learning_rate=0.1, momentum=0.9), [1.0] * 4, [0.1, 0.1, 0.01, 0.01])
    assert sig(w) == "0.356"


# --- optax ----------------------------------------------------------------------------------------------------------
def _optax_steps(make, grads):
    pytest.importorskip("jax")
    optax = pytest.importorskip("optax")
    import jax.numpy as jnp

    opt = make(optax)
    w = jnp.ones(1)
    state = opt.init(w)
    for g in grads:
        upd, state = opt.update(jnp.full(1, g), state, w)
        w = optax.apply_updates(w, upd)
    return float(w[0])


def test_optax_defaults():
    assert sig(_optax_steps(lambda o: o.rmsprop(1e-3), [0.1]) - 1) == "-0.00316"
    assert sig(_optax_steps(lambda o: o.adagrad(1e-2), [0.1]) - 1, 2) == "-0.003"  # 1e-2 * 0.1 / sqrt(0.1 + 0.01) = 3.02e-3


# --- TF1 (tf.compat.v1 optimizers, graph mode) ----------------------------------------------------------------------
def _tf1_step(make, g):
    tf = pytest.importorskip("tensorflow")
    v1 = tf.compat.v1
    graph = tf.Graph()
    with graph.as_default():
        w = v1.get_variable("w", initializer=np.ones(1))
        train = make(v1).apply_gradients([(tf.constant(np.full(1, g)), w)])
        with v1.Session(graph=graph) as sess:
            sess.run(v1.global_variables_initializer())
            sess.run(train)
            return float(sess.run(w)[0])


def test_tf1_defaults():
    # the RMSprop accumulator starts at 1.0: the first update is ~30x smaller than Keras'
    assert sig(_tf1_step(lambda v1: v1.train.RMSPropOptimizer(1e-3), 0.1) - 1) == "-0.000105"
    assert sig(_tf1_step(lambda v1: v1.train.AdagradOptimizer(1e-2), 0.1) - 1, 2) == "-0.003"
