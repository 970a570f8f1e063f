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

Layers and optimizers come from :data:`LAYER_BUILDERS` / :data:`OPTIMIZER_BUILDERS` (``backends.base.lookup`` at
construction: an unknown type is ``Unsupported("tf1 has no <Type>")``); the layer builders are ``tf2_tape``'s, except
BatchNorm and Dropout, whose native forms are TF1's.

Training and inference: one graph holds two forward passes over the same variables, the training pass (batch
statistics, dropout) feeding the loss, gradients and train op, the inference pass (moving statistics, no dropout)
feeding ``predict``.  BatchNorm's moving statistics are non-trainable variables; their assign ops go into the graph's
``UPDATE_OPS`` collection and the train op groups them with the optimizer's update, as TF1 code does (there with
``tf.control_dependencies(UPDATE_OPS)`` around ``minimize``): they run with ``train_step`` and never with the
``gradients`` fetch.  Aligned dropout multiplies by the harness's masks,
fed through placeholders of shape ``(None, ...)`` (one per Dropout layer), the same masks for ``gradients`` at step t
and the update of step t.  Aligned BatchNorm is ``tf2_tape.bn_aligned`` (``tf.nn.moments`` + ``tf.nn.batch_normalization``).

Native BatchNorm is the graph ``tf.compat.v1.layers.batch_normalization(x, training=True)`` builds with its defaults
(the TF 2.x Keras-2 ``BatchNormalization`` V1 layer: ``momentum=0.99, epsilon=1e-3, fused=None``; that function itself
is gone from this TensorFlow with Keras 3, "`batch_normalization` is not available with Keras 3", so its ops are
written here).  ``fused=None`` means the fused kernel for a 4-D input of a dtype it takes (float16/bfloat16/float32:
``FusedBatchNormV3`` has no float64), else the plain ops:

* fused (4-D, float32): ``tf.compat.v1.nn.fused_batch_norm(is_training=True)``, which normalises with the biased
  variance but *returns the batch variance with Bessel's correction* (measured: ``var * n / (n - 1)``), and the layer
  stores it as is (``_bessels_correction_test_only = True``): the moving variance is the unbiased one.  In a graph the
  layer does not use the kernel's own averaging: ``moving -= (moving - stat) * (1 - momentum)`` with ``momentum`` a
  float32 tensor (so ``1 - f32(0.99)``, the spec's value).
* plain (2-D, or float64): ``tf.nn.moments`` (biased) and ``tf.nn.batch_normalization(..., 1e-3)`` (epsilon a Python
  float: 0.001 in a float64 run), ``moving -= (moving - stat) * decay`` with ``decay`` the Python double ``1 - 0.99``
  made a float32 tensor and then cast (0.0099999998, not the spec's ``1 - f32(0.99)`` = 0.0099999905).

Native dropout is ``tf.compat.v1.nn.dropout(x, rate=...)`` with TensorFlow's RNG (graph seed: the run's seed).
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from models.spec import SGD, Adam, BatchNorm, Dropout, ModelSpec, init_state  # noqa: E402

from . import tf2_tape  # noqa: E402
from .base import BuildOptions, Capabilities, ModelBase, Unsupported, lookup  # noqa: E402
from .tf2_tape import (  # noqa: E402
    NATIVE_DROPOUT_DIFF,
    Ctx,
    adam_update,
    environment_info,
    fmt,
    forward,
    hyper,
    loss_fn,
    native_bn_diffs,
    new_state,
    predict_fn,
    tf_device,
    value_diff,
)

v1 = tf.compat.v1

CAPABILITIES = Capabilities(
    devices=("cpu", "cuda"),
    notes=("tf.compat.v1 graph + Session; tf.compat.v1.train optimizers with float64 hyperparameter tensors",),
)
BACKEND = "tf1"

TF1_ADAM_DEFAULT_EPS = 1e-8  # tf.compat.v1.train.AdamOptimizer(epsilon=1e-08)
TF1_BN_MOMENTUM = 0.99  # tf.compat.v1.layers.batch_normalization(momentum=0.99, epsilon=1e-3, fused=None)
TF1_BN_EPSILON = 1e-3
FUSED_DTYPES = (tf.float16, tf.bfloat16, tf.float32)  # FusedBatchNormV3's T


def probe() -> str:
    return tf.__version__


def devices() -> list[str]:
    return ["cpu"] + (["cuda"] if tf.config.list_physical_devices("GPU") else [])


# --------------------------------------------------------------------------------------------------------- layers
def fused_path(x_ndims: int, dtype) -> bool:
    """Whether ``tf.compat.v1.layers.batch_normalization(fused=None)`` takes the fused kernel for this input."""
    return x_ndims == 4 and tf.as_dtype(dtype) in FUSED_DTYPES


def _bn_tf1_native(ctx, i, layer, p, s, x):
    """The graph tf.compat.v1.layers.batch_normalization(x, training=...) builds with its defaults."""
    mm, mv = s["moving_mean"], s["moving_variance"]
    if fused_path(len(x.shape), ctx.dtype):
        if not ctx.training:
            y, _, _ = v1.nn.fused_batch_norm(x, p["gamma"], p["beta"], mean=mm, variance=mv, epsilon=TF1_BN_EPSILON,
                                             is_training=False)
            return y
        # the batch mean and the batch variance *with* Bessel's correction (stored as is by the layer)
        y, mean, var = v1.nn.fused_batch_norm(x, p["gamma"], p["beta"], epsilon=TF1_BN_EPSILON, is_training=True)
        decay = tf.cast(1.0 - tf.convert_to_tensor(TF1_BN_MOMENTUM), mm.dtype)  # momentum a float32 tensor in a graph
    else:
        if not ctx.training:
            return tf.nn.batch_normalization(x, mm, mv, p["beta"], p["gamma"], TF1_BN_EPSILON)
        mean, var = tf.nn.moments(x, list(range(len(x.shape) - 1)))
        y = tf.nn.batch_normalization(x, mean, var, p["beta"], p["gamma"], TF1_BN_EPSILON)
        decay = tf.cast(tf.convert_to_tensor(1.0 - TF1_BN_MOMENTUM), mm.dtype)  # a Python double -> float32 -> cast
    ctx.new_state[i] = {"moving_mean": mm - (mm - mean) * decay, "moving_variance": mv - (mv - var) * decay}
    return y


def _batchnorm(ctx, i, layer, p, s, x):
    return (_bn_tf1_native if ctx.native else tf2_tape.bn_aligned)(ctx, i, layer, p, s, x)


def _dropout(ctx, i, layer, p, s, x):
    if not ctx.training or layer.rate == 0:
        return x
    if ctx.native:  # TF1's dropout and RNG (the graph-level seed is the run's)
        return v1.nn.dropout(x, rate=layer.rate)
    return x * ctx.masks[i]  # the harness's mask, fed through a placeholder


LAYER_BUILDERS = {**tf2_tape.LAYER_BUILDERS, BatchNorm: _batchnorm, Dropout: _dropout}


def _tf1_bn_used(dtype: str):
    def used(layer, shape):
        if fused_path(len(shape) + 1, dtype):
            decay = float(np.float32(1.0) - np.float32(TF1_BN_MOMENTUM))
            return (float(np.float32(TF1_BN_MOMENTUM)), decay, float(np.float32(TF1_BN_EPSILON)), True,
                    " (tf.compat.v1.layers.batch_normalization default, fused FusedBatchNormV3 path)")
        decay = float(np.float32(1.0 - TF1_BN_MOMENTUM))
        return (1.0 - decay, decay, TF1_BN_EPSILON, False,
                " (tf.compat.v1.layers.batch_normalization default, non-fused path: 1 - 0.99 a float32 tensor)")
    return used


# ----------------------------------------------------------------------------------------------------- optimizers
# optimizer type -> builder(model, opt, dtype, pairs) -> (train op, native differences); sets info["optimizer"]
def _native_lr(model, opt):
    f32 = float(np.float32(opt.lr))
    return [value_diff("learning rate", f32, opt.lr, model.options.dtype, " (a Python float: a float32 tensor)")]


def _sgd(model, opt, dtype, pairs):
    if model.native:  # a TF1 tutorial: Python floats, which TF1 turns into float32 tensors (cast per update)
        model.info["optimizer"] = (f"built-in tf.compat.v1.train.GradientDescentOptimizer; "
                                   f"GradientDescentOptimizer({fmt(opt.lr)})")
        return v1.train.GradientDescentOptimizer(learning_rate=opt.lr).apply_gradients(pairs), _native_lr(model, opt)
    hp = hyper(opt, dtype)
    model.info["optimizer"] = ("built-in tf.compat.v1.train.GradientDescentOptimizer; learning rate a tensor of the "
                               "run dtype")
    return v1.train.GradientDescentOptimizer(learning_rate=hp["lr"]).apply_gradients(pairs), []


def _adam(model, opt, dtype, pairs):
    if model.native:
        f32 = lambda v: float(np.float32(v))  # noqa: E731
        dt = model.options.dtype
        o = v1.train.AdamOptimizer(learning_rate=opt.lr)  # beta1=0.9, beta2=0.999, epsilon=1e-8
        diffs = _native_lr(model, opt)
        diffs += [value_diff("Adam epsilon", f32(TF1_ADAM_DEFAULT_EPS), opt.epsilon, dt, nominal=TF1_ADAM_DEFAULT_EPS),
                  value_diff("Adam beta1", f32(0.9), opt.beta1, dt),
                  value_diff("Adam beta2", f32(0.999), opt.beta2, dt)]
        if opt.convention != "eps_hat":
            diffs.append(f"Adam epsilon convention eps_hat (spec {opt.convention})")
        if dtype == tf.float64:
            diffs.append("Adam beta powers accumulated in float32 variables (beta1^t, beta2^t)")
        model.info["optimizer"] = (f"built-in tf.compat.v1.train.AdamOptimizer; AdamOptimizer(learning_rate="
                                   f"{fmt(opt.lr)}), defaults otherwise")
        return o.apply_gradients(pairs), diffs
    hp = hyper(opt, dtype)
    if opt.convention == "eps_hat":
        model.info["optimizer"] = ("built-in tf.compat.v1.train.AdamOptimizer; hyperparameters as tensors of the run "
                                   "dtype")
        return v1.train.AdamOptimizer(learning_rate=hp["lr"], beta1=hp["beta1"], beta2=hp["beta2"],
                                      epsilon=hp["epsilon"]).apply_gradients(pairs), []
    # AdamOptimizer has eps_hat only: write the eps_v_hat update with TF ops
    model.info["optimizer"] = (f"hand-written, spec convention ({opt.convention}); AdamOptimizer adds a constant "
                               "eps to sqrt(v) (eps_hat) only")
    params = [p for _, p in pairs]
    t = v1.Variable(np.int64(0), name="t")
    m = [v1.Variable(tf.zeros_like(p.initial_value), name="m") for p in params]
    v = [v1.Variable(tf.zeros_like(p.initial_value), name="v") for p in params]
    return tf.group(*adam_update(params, [g for g, _ in pairs], m, v, t, hp, opt.convention)), []


OPTIMIZER_BUILDERS = {SGD: _sgd, Adam: _adam}


# ------------------------------------------------------------------------------------------------------- the model
class Model(ModelBase):
    capabilities = CAPABILITIES

    def __init__(self, spec: ModelSpec, weights: list[np.ndarray], options: BuildOptions) -> None:
        super().__init__(spec, weights, options)
        for layer in spec.layers:  # every layer and the optimizer from the tables, before any work
            lookup(LAYER_BUILDERS, layer, BACKEND)
        build_optimizer = lookup(OPTIMIZER_BUILDERS, spec.optimizer, BACKEND)
        if options.device not in devices():
            raise Unsupported(f"device {options.device} not available to TensorFlow (has {devices()})")
        self.np_dtype = np.dtype(options.dtype)
        dtype = tf.as_dtype(self.np_dtype)
        self.native = native = options.mode == "native"
        self.updates = 0  # updates applied so far: the step whose dropout masks the next pass uses
        self.info = {**environment_info(), "device": tf_device(options.device), "threads": options.threads,
                     "loss": "tf.nn ops on logits (stable formula)" if spec.loss.kind != "sse" else "sum of squares"}
        shapes = spec.input_shapes()
        self.graph = tf.Graph()
        with self.graph.as_default(), tf.device(tf_device(options.device)):
            if native:
                v1.set_random_seed(options.seed)  # native dropout: TF's RNG, seeded by the run
            self.x = v1.placeholder(dtype, [None, *spec.input_shape], name="x")
            if spec.loss.integer_labels:
                self.y = v1.placeholder(tf.int64, [None], name="y")
            else:
                self.y = v1.placeholder(dtype, [None, *spec.output_shape], name="y")
            self.masks = [] if native else [v1.placeholder(dtype, [None, *shapes[i]], name=f"mask{i}")
                                            for i in spec.random_layers]
            self.params = [v1.Variable(np.asarray(w, self.np_dtype), name=n.replace("/", "_"))
                           for w, n in zip(weights, spec.param_names())]
            self.state = [v1.Variable(np.asarray(s, self.np_dtype), name=n.replace("/", "_"), trainable=False)
                          for s, n in zip(init_state(spec), spec.state_names())]
            # the training pass: loss, gradients, and the state it moves
            ctx = Ctx(dtype, True, native, dict(zip(spec.random_layers, self.masks)), options.seed)
            out = forward(spec, self.params, self.x, ctx, self.state, LAYER_BUILDERS, BACKEND)
            self.loss = loss_fn(spec, out, self.y)
            grads = v1.gradients(self.loss, self.params)
            with tf.control_dependencies([self.loss]):  # every update waits for the loss: it is the pre-update loss
                self.grads = [tf.identity(g) for g in grads]
            for var, value in zip(self.state, new_state(spec, ctx, self.state)):
                if value is not var:
                    v1.add_to_collection(v1.GraphKeys.UPDATE_OPS, var.assign(value, read_value=False))
            apply_op, diffs = build_optimizer(self, spec.optimizer, dtype, list(zip(self.grads, self.params)))
            # the state moves with the update (grouped after the optimizer is built: its slot variables' initializers
            # must not depend on the update ops, hence on the fed batch)
            self.train_op = tf.group(apply_op, *v1.get_collection(v1.GraphKeys.UPDATE_OPS))
            # the inference pass over the same variables: moving statistics, no dropout
            out_inf = forward(spec, self.params, self.x, Ctx(dtype, False, native), self.state, LAYER_BUILDERS,
                              BACKEND)
            self.pred = predict_fn(spec, out_inf)
            init = v1.global_variables_initializer()
        self.graph.finalize()  # nothing is added per step
        if self.state:
            self.info["batchnorm"] = (
                "native: the graph of tf.compat.v1.layers.batch_normalization(training=...) with its defaults "
                "(momentum 0.99, epsilon 1e-3, fused=None: FusedBatchNormV3 for 4-D float32 input, storing the "
                "unbiased variance; tf.nn.moments otherwise), updates in UPDATE_OPS run with the train op"
                if native else
                "tf.nn.moments + tf.nn.batch_normalization, spec momentum/epsilon as run-dtype tensors; state in "
                "non-trainable variables assigned by UPDATE_OPS run with the train op")
            if native:
                diffs = diffs + native_bn_diffs(spec, options.dtype, _tf1_bn_used(options.dtype))
        if spec.random_layers:
            self.info["dropout"] = ("native: tf.compat.v1.nn.dropout, TensorFlow's RNG" if native else
                                    "the harness's masks, fed through placeholders (None, ...)")
            if native:
                diffs = diffs + [NATIVE_DROPOUT_DIFF]
        if native:
            self.info["native_differences"] = [d for d in diffs if d]
        config = v1.ConfigProto()
        if options.threads:
            config.intra_op_parallelism_threads = options.threads
            config.inter_op_parallelism_threads = options.threads
        self.sess = v1.Session(graph=self.graph, config=config)
        self.sess.run(init)

    def _feed(self, x, y):
        y = np.asarray(y, np.int64 if self.spec.loss.integer_labels else self.np_dtype)
        x = np.asarray(x, self.np_dtype)
        feed = {self.x: x, self.y: y}
        if self.masks:  # this step's aligned dropout masks
            feed.update(zip(self.masks, self.dropout_masks(self.updates, len(x), self.np_dtype)))
        return feed

    def train_step(self, x, y):
        loss, _ = self.sess.run([self.loss, self.train_op], self._feed(x, y))
        self.updates += 1
        return float(loss)

    def gradients(self, x, y):
        loss, grads = self.sess.run([self.loss, self.grads], self._feed(x, y))
        return float(loss), [np.asarray(g) for g in grads]

    def predict(self, x):
        return self.sess.run(self.pred, {self.x: np.asarray(x, self.np_dtype)})

    def get_weights(self):
        return [np.array(w) for w in self.sess.run(self.params)]

    def get_state(self):
        return [np.array(s) for s in self.sess.run(self.state)]

    def __del__(self):
        sess = getattr(self, "sess", None)
        if sess is not None:
            sess.close()
