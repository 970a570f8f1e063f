"""The seed tutorials, reproduced (issue 13).

The TF1 perceptron tutorial: OR gate, ``w = tf.random_normal([3, 1], seed=15)``, ``relu(x @ w)`` without bias, loss
``reduce_sum`` of squares, gradient descent 0.01, 100 full-batch updates; it prints the loss after each update, which
"started at 2.07 and ended at 0.27".  The built-in model ``perceptron_or`` carries the initial weights TF1 draws
(explicit initial values), and every backend must reproduce both numbers (a ``harness compare`` run, judged against the
oracle like any other)."""

import pytest

from backends.base import BuildOptions
from backends.numpy_scratch import Model
from harness import runner
from harness.status import Status
from models import get_model, init_weights
from models.data import load_dataset


def test_the_oracle_prints_the_tutorials_losses():
    spec = get_model("perceptron_or")
    ds = load_dataset(spec.dataset)
    m = Model(spec, init_weights(spec, seed=123), BuildOptions(dtype="float32"))  # explicit values: no seed used
    losses = [m.train_step(ds.x_train, ds.y_train) for _ in range(101)]  # loss *before* each update
    assert f"{losses[1]:.2f}" == "2.07" and f"{losses[100]:.2f}" == "0.27"  # after the 1st and the 100th update
    assert f"{losses[0]:.2f}" == "2.54"  # the tutorial never prints the loss at the initial weights


def test_the_tf1_seeded_initializer_draws_those_weights():
    """Where it comes from: TF1's ``tf.random_normal([3, 1], seed=15)`` (op seed 15, no graph seed) on this machine."""
    tf = pytest.importorskip("tensorflow")
    graph = tf.Graph()
    with graph.as_default():
        w = tf.compat.v1.random_normal([3, 1], seed=15)
        with tf.compat.v1.Session(graph=graph) as sess:
            drawn = sess.run(w).ravel().tolist()
    assert drawn == pytest.approx(list(get_model("perceptron_or").init.explicit[0]), abs=1e-7)


def test_every_backend_reproduces_the_perceptron_tutorial(tmp_path):
    cfg = runner.CompareConfig(model="perceptron_or", batch_sizes=[4], steps=101, timing=False, repeat=False,
                               dtype="float32")
    result = runner.compare(cfg)
    ran = [r for r in result["rows"] if r["status"] != Status.SKIPPED]
    assert len(ran) >= 1
    for row in ran:
        assert row["status"] == Status.PASS, (row["backend"], row["status"], row.get("reason"))
        losses = row["arrays"]["losses"]
        assert (f"{losses[1]:.2f}", f"{losses[100]:.2f}") == ("2.07", "0.27"), row["backend"]
