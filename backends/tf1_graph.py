"""TF1 graph mode: ``tf.compat.v1`` placeholders and variables in a ``tf.Graph`` of their own, one ``Session``, one
``session.run`` per step, ``tf.compat.v1.train`` optimizers, gradients from ``tf.compat.v1.gradients``.

Layouts: TensorFlow's own are the canonical ones (dense ``(in, out)``, conv HWIO via ``tf.nn.conv2d`` NHWC, flatten in
(h, w, c) order), so weights go in and come out as they are: no conversion anywhere.

Aligned mode: the built-in ``GradientDescentOptimizer`` and, for the spec's ``eps_hat`` convention, the built-in
``AdamOptimizer`` (its fused ``ApplyAdam`` kernel is the eps-hat form in Keras' order: ``alpha = lr*sqrt(1-b2^t)/(1-b1^t)``,
``m += (g - m)*(1-b1)``, ``v += (g*g - v)*(1-b2)``, ``var -= m*alpha/(sqrt(v) + eps)``; the beta powers are accumulated
by one multiplication per step, not ``pow``), every hyperparameter given as a ``tf.constant`` of the run's dtype; the
losses from logits with the fused stable ``tf.nn`` ops.  ``AdamOptimizer`` has no ``eps_v_hat`` form (a constant eps
added to ``sqrt(v)``), so a spec asking for that convention gets the update written with TF ops
(``tf2_tape.adam_update``).  ``info["optimizer"]`` says which ran: ``"built-in tf.compat.v1.train.AdamOptimizer"`` or
``"hand-written, spec convention (eps_v_hat)"``.
Native mode is the optimizer as a TF1 tutorial writes it: Python-float hyperparameters and ``AdamOptimizer``'s default
epsilon 1e-8.

Quirks (measured, see ``shared/guides/numerics.md``): TF1 optimizers turn Python-float hyperparameters into float32
tensors -- the learning rate, betas, epsilon *and* the beta-power accumulators -- and cast them to float64 at each
update, so a float64 run with Python floats is not a float64 optimizer.  The loss is fetched in the same
``session.run`` as the update, under a control dependency that makes the update wait for it.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from models.spec import Adam, ModelSpec  # noqa: E402

from .base import BuildOptions, Capabilities, ModelBase, Unsupported  # noqa: E402
from .tf2_tape import adam_update, environment_info, fmt, forward, hyper, loss_fn, predict_fn, tf_device, value_diff  # noqa: E402

v1 = tf.compat.v1

CAPABILITIES = Capabilities(
    devices=("cpu", "cuda"),
    notes=("tf.compat.v1 graph + Session; tf.compat.v1.train optimizers with float64 hyperparameter tensors",),
)

TF1_ADAM_DEFAULT_EPS = 1e-8  # tf.compat.v1.train.AdamOptimizer(epsilon=1e-08)


def probe() -> str:
    return tf.__version__


def devices() -> list[str]:
    return ["cpu"] + (["cuda"] if tf.config.list_physical_devices("GPU") else [])


class Model(ModelBase):
    capabilities = CAPABILITIES

    def __init__(self, spec: ModelSpec, weights: list[np.ndarray], options: BuildOptions) -> None:
        super().__init__(spec, weights, options)
        if options.device not in devices():
            raise Unsupported(f"device {options.device} not available to TensorFlow (has {devices()})")
        self.np_dtype = np.dtype(options.dtype)
        dtype = tf.as_dtype(self.np_dtype)
        opt = spec.optimizer
        native = options.mode == "native"
        self.info = {**environment_info(), "device": tf_device(options.device), "threads": options.threads,
                     "loss": "tf.nn ops on logits (stable formula)" if spec.loss.kind != "sse" else "sum of squares"}
        self.graph = tf.Graph()
        with self.graph.as_default(), tf.device(tf_device(options.device)):
            self.x = v1.placeholder(dtype, [None, *spec.input_shape], name="x")
            if spec.loss.integer_labels:
                self.y = v1.placeholder(tf.int64, [None], name="y")
            else:
                self.y = v1.placeholder(dtype, [None, *spec.output_shape], name="y")
            self.params = [v1.Variable(np.asarray(w, self.np_dtype), name=n.replace("/", "_"))
                           for w, n in zip(weights, spec.param_names())]
            out = forward(spec, self.params, self.x)
            self.loss = loss_fn(spec, out, self.y)
            self.pred = predict_fn(spec, out)
            grads = v1.gradients(self.loss, self.params)
            with tf.control_dependencies([self.loss]):  # every update waits for the loss: it is the pre-update loss
                self.grads = [tf.identity(g) for g in grads]
            self.train_op = self._build_optimizer(opt, dtype, native)
            init = v1.global_variables_initializer()
        self.graph.finalize()  # nothing is added per step
        config = v1.ConfigProto()
        if options.threads:
            config.intra_op_parallelism_threads = options.threads
            config.inter_op_parallelism_threads = options.threads
        self.sess = v1.Session(graph=self.graph, config=config)
        self.sess.run(init)

    def _build_optimizer(self, opt, dtype, native):
        pairs = list(zip(self.grads, self.params))
        if native:  # a TF1 tutorial: Python floats, which TF1 turns into float32 tensors (cast per update)
            f32 = lambda v: float(np.float32(v))  # noqa: E731
            dt = self.options.dtype
            diffs = [value_diff("learning rate", f32(opt.lr), opt.lr, dt, " (a Python float: a float32 tensor)")]
            if isinstance(opt, Adam):
                o = v1.train.AdamOptimizer(learning_rate=opt.lr)  # beta1=0.9, beta2=0.999, epsilon=1e-8
                diffs += [value_diff("Adam epsilon", f32(TF1_ADAM_DEFAULT_EPS), opt.epsilon, dt,
                                     nominal=TF1_ADAM_DEFAULT_EPS),
                          value_diff("Adam beta1", f32(0.9), opt.beta1, dt),
                          value_diff("Adam beta2", f32(0.999), opt.beta2, dt)]
                if opt.convention != "eps_hat":
                    diffs.append(f"Adam epsilon convention eps_hat (spec {opt.convention})")
                if dtype == tf.float64:
                    diffs.append("Adam beta powers accumulated in float32 variables (beta1^t, beta2^t)")
                self.info["optimizer"] = (f"built-in tf.compat.v1.train.AdamOptimizer; AdamOptimizer(learning_rate="
                                          f"{fmt(opt.lr)}), defaults otherwise")
            else:
                o = v1.train.GradientDescentOptimizer(learning_rate=opt.lr)
                self.info["optimizer"] = (f"built-in tf.compat.v1.train.GradientDescentOptimizer; "
                                          f"GradientDescentOptimizer({fmt(opt.lr)})")
            self.info["native_differences"] = [d for d in diffs if d]
            return o.apply_gradients(pairs)
        hp = hyper(opt, dtype)
        if not isinstance(opt, Adam):
            self.info["optimizer"] = ("built-in tf.compat.v1.train.GradientDescentOptimizer; learning rate a tensor of the "
                                      "run dtype")
            return v1.train.GradientDescentOptimizer(learning_rate=hp["lr"]).apply_gradients(pairs)
        if opt.convention == "eps_hat":
            self.info["optimizer"] = ("built-in tf.compat.v1.train.AdamOptimizer; hyperparameters as tensors of the run "
                                      "dtype")
            return v1.train.AdamOptimizer(learning_rate=hp["lr"], beta1=hp["beta1"], beta2=hp["beta2"],
                                          epsilon=hp["epsilon"]).apply_gradients(pairs)
        # AdamOptimizer has eps_hat only: write the eps_v_hat update with TF ops
        self.info["optimizer"] = (f"hand-written, spec convention ({opt.convention}); AdamOptimizer adds a constant "
                                  "eps to sqrt(v) (eps_hat) only")
        t = v1.Variable(np.int64(0), name="t")
        m = [v1.Variable(tf.zeros_like(p.initial_value), name="m") for p in self.params]
        v = [v1.Variable(tf.zeros_like(p.initial_value), name="v") for p in self.params]
        return tf.group(*adam_update(self.params, self.grads, m, v, t, hp, opt.convention))

    def _feed(self, x, y):
        y = np.asarray(y, np.int64 if self.spec.loss.integer_labels else self.np_dtype)
        return {self.x: np.asarray(x, self.np_dtype), self.y: y}

    def train_step(self, x, y):
        loss, _ = self.sess.run([self.loss, self.train_op], self._feed(x, y))
        return float(loss)

    def gradients(self, x, y):
        loss, grads = self.sess.run([self.loss, self.grads], self._feed(x, y))
        return float(loss), [np.asarray(g) for g in grads]

    def predict(self, x):
        return self.sess.run(self.pred, {self.x: np.asarray(x, self.np_dtype)})

    def get_weights(self):
        return [np.array(w) for w in self.sess.run(self.params)]

    def __del__(self):
        sess = getattr(self, "sess", None)
        if sess is not None:
            sess.close()
