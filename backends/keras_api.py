"""Keras 3, high level: a ``Sequential`` model built from the spec, ``compile``, ``train_on_batch`` / ``fit``.

One module for the three Keras backends; ``KERAS_BACKEND`` (set by the registry in this subprocess's environment)
picks TensorFlow, JAX or torch, and ``keras.backend.backend()`` says which one this process runs.

Layouts: Keras 3 (channels_last) takes the canonical arrays as they are: Dense kernels ``(in, out)``, Conv2D kernels
HWIO, NHWC activations and ``Flatten`` in (h, w, c) order, on every Keras backend.  ``set_weights`` / ``get_weights``
exchange them unchanged (shapes are checked against the spec first).

Aligned mode: the last layer stays linear and the losses are Keras' own from logits --
``BinaryCrossentropy(from_logits=True)``, ``SparseCategoricalCrossentropy(from_logits=True)`` -- or, for the spec's sum
of squared errors, a small ``keras.losses.Loss`` summing over the output units (``MeanSquaredError`` would *mean* over
them); reduction ``"sum"`` or ``"sum_over_batch_size"`` per the spec.  The optimizers are the built-in ``keras.optimizers.SGD``
and ``keras.optimizers.Adam`` with the spec's hyperparameters (floatx is the run's dtype, so the learning-rate variable
is too).  Keras' Adam (``keras/src/optimizers/adam.py``) is the eps_hat form in the oracle's order; it has no
``eps_v_hat`` form, and its epsilon is a Python constant baked into the compiled train function, so a spec asking for
``eps_v_hat`` raises ``Unsupported`` rather than running something else.  ``info["optimizer"]`` says
``"built-in keras.optimizers.Adam; ..."``.
Native mode is what a Keras user writes: sigmoid / softmax output layer with ``BinaryCrossentropy()`` /
``SparseCategoricalCrossentropy()`` on probabilities, ``"mse"`` for a squared error, ``Adam(learning_rate=...)`` with
its defaults.  Initial weights are still the canonical ones.

Training: ``train_step`` and ``train_steps`` call ``train_on_batch``, which returns each step's own loss.  ``fit`` only
logs a running mean per epoch, from which per-step losses come back only approximately -- not within the harness's
tolerances (see :meth:`Model.fit_epoch`); ``fit`` and a ``train_on_batch`` loop over the same batches give
bit-identical weights (tested).
Gradients (no update) use each backend's autodiff on the Keras model: ``tf.GradientTape`` (tensorflow),
``model.stateless_call`` + ``jax.value_and_grad`` (jax), ``loss.backward()`` on zeroed grads (torch).

Quirks: float64 needs ``keras.config.set_floatx`` *and* ``set_dtype_policy`` before building.  Keras 3.15.1 on torch
is not float64 (its ``result_type(float64, float64)`` is float32, so a float64 ``Dense`` matmul rounds to float32):
such runs raise ``Unsupported``.  Keras on JAX is float64 only with ``JAX_ENABLE_X64`` set before JAX is imported.
On TensorFlow, ``BinaryCrossentropy()`` on a sigmoid output silently uses the logits path; on JAX / torch it clips.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from models.spec import Adam, Conv2D, Dense, Flatten, MaxPool2D, ModelSpec  # noqa: E402

from .base import BuildOptions, Capabilities, ModelBase, Unsupported, fmt, one_minus_beta_diffs, value_diff  # noqa: E402

BACKEND = keras.backend.backend()

if BACKEND == "tensorflow":
    import tensorflow as tf
elif BACKEND == "jax":
    import jax
elif BACKEND == "torch":
    import torch

CAPABILITIES = Capabilities(
    dtypes=("float32",) if BACKEND == "torch" else ("float32", "float64"),
    devices=("cpu", "cuda"),
    notes=(f"Keras {keras.__version__} on {BACKEND}: train_on_batch, fit; built-in losses and optimizers",),
)




def probe() -> str:
    return f"{keras.__version__} ({BACKEND} {_framework_version()})"


def _framework_version() -> str:
    if BACKEND == "tensorflow":
        return tf.__version__
    if BACKEND == "jax":
        return jax.__version__
    if BACKEND == "torch":
        return torch.__version__
    return "?"


def devices() -> list[str]:
    found = ["cpu"]
    try:
        if BACKEND == "tensorflow" and tf.config.list_physical_devices("GPU"):
            found.append("cuda")
        elif BACKEND == "jax" and any(d.platform == "gpu" for d in jax.devices()):
            found.append("cuda")
        elif BACKEND == "torch" and torch.cuda.is_available():
            found.append("cuda")
    except RuntimeError:
        pass
    return found


def torch_float64_problem() -> str | None:
    """Why Keras on torch cannot run float64, from what this Keras version does (None if it can)."""
    from keras.src.backend.common import dtypes

    rt = dtypes.result_type("float64", "float64")
    if rt == "float64":
        return None
    a = np.linspace(0.1, 1.3, 9).reshape(3, 3)
    with keras.device("cpu:0"):
        t = keras.ops.convert_to_tensor(a, dtype="float64")
        got = keras.ops.convert_to_numpy(keras.ops.matmul(t, t))
    err = float(np.max(np.abs(got.astype(np.float64) - a @ a)) / np.max(np.abs(a @ a)))
    return (f"Keras {keras.__version__} on torch computes matmuls in float32 (result_type(float64, float64) -> "
            f"{rt}; keras.ops.matmul of two float64 tensors returns {got.dtype}, relative error {err:.1e}): "
            f"a float64 row would be a float32 row in disguise")


class SumSquaredError(keras.losses.Loss):
    """The spec's "sse": per sample, the *sum* over output units of (out - y)^2 (Keras' MSE means over them)."""

    def call(self, y_true, y_pred):
        return keras.ops.sum(keras.ops.square(y_pred - y_true), axis=-1)


class BinaryCrossentropyFromLogits(keras.losses.Loss):
    """``BinaryCrossentropy(from_logits=True)`` with the mean over the units written as sum / units.

    Keras' own averages with ``ops.mean``, which on JAX (and torch) computes in ``result_type(dtype, "float32")`` --
    float32 even for float64 input in Keras 3.15.1 -- so a float64 run would carry a float32 rounding (~1e-8).
    """

    def call(self, y_true, y_pred):
        per_unit = keras.ops.binary_crossentropy(y_true, y_pred, from_logits=True)
        return keras.ops.sum(per_unit, axis=-1) / per_unit.shape[-1]


def demotes_float64() -> bool:
    """True when Keras' type promotion maps float64 to float32 (every Keras 3.15.1 backend but TensorFlow)."""
    return keras.backend.result_type("float64") != "float64"


def _set_threads(threads: int | None, info: dict) -> None:
    if not threads:
        return
    if BACKEND == "tensorflow":
        from .tf2_tape import set_threads

        set_threads(threads)
        info["threads"] = f"tf intra/inter op {threads}"
    elif BACKEND == "torch":
        torch.set_num_threads(threads)
        info["threads"] = f"torch.set_num_threads({threads})"
    else:  # XLA's CPU thread pool is fixed when JAX starts; the harness sets OMP_NUM_THREADS before that
        info["threads"] = f"jax: not settable after import (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')})"


class Model(ModelBase):
    capabilities = CAPABILITIES

    def __init__(self, spec: ModelSpec, weights: list[np.ndarray], options: BuildOptions) -> None:
        if BACKEND == "torch" and options.dtype == "float64":
            problem = torch_float64_problem()
            if problem:
                raise Unsupported(problem)
        super().__init__(spec, weights, options)
        if options.dtype == "float64" and BACKEND == "jax" and not jax.config.jax_enable_x64:
            raise Unsupported("Keras on JAX float64 needs JAX_ENABLE_X64=1 before JAX is imported (it is off in this "
                              "process, so float64 arrays would silently become float32)")
        if options.device not in devices():
            raise Unsupported(f"device {options.device} not available to Keras on {BACKEND} (has {devices()})")
        self.info = {"keras_backend": BACKEND, "keras_version": keras.__version__,
                     "framework_version": _framework_version(), "device": options.device}
        if BACKEND in ("tensorflow",):
            self.info["TF_ENABLE_ONEDNN_OPTS"] = os.environ.get("TF_ENABLE_ONEDNN_OPTS",
                                                                "unset (oneDNN on by default on x86)")
        _set_threads(options.threads, self.info)
        self.np_dtype = np.dtype(options.dtype)
        keras.config.set_floatx(options.dtype)
        keras.config.set_dtype_policy(options.dtype)
        self.native = options.mode == "native"
        # "cpu" / "gpu", not "cpu:0": on torch, keras.device("cpu:0") makes every variable a non-leaf copy
        # (Parameter(...).to("cpu:0")), so backward() leaves no gradients ("No gradients provided for any variable")
        self.device = "gpu" if options.device == "cuda" else "cpu"
        diffs: list[str] = []

        with keras.device(self.device):
            self.model = self._build(spec, diffs)
            expected = [tuple(s) for s in spec.param_shapes()]
            got = [tuple(w.shape) for w in self.model.get_weights()]
            if got != expected:
                raise ValueError(f"{spec.name}: the Keras model has weight shapes {got}, the spec {expected}")
            self.model.set_weights([np.asarray(w, self.np_dtype) for w in weights])
            if BACKEND == "torch" and not all(v.value.is_leaf for v in self.model.trainable_variables):
                raise RuntimeError("Keras on torch made non-leaf variables: autograd would give them no gradients")
            self.loss_obj = self._loss(spec, diffs)
            self.optimizer = self._optimizer(spec.optimizer, diffs)
            jit = True if options.fast else "auto"
            self.model.compile(optimizer=self.optimizer, loss=self.loss_obj, jit_compile=jit)
            self.info["jit_compile"] = bool(self.model.jit_compile)
        if self.native:
            self.info["native_differences"] = diffs

    # -- building ---------------------------------------------------------------------------------------------------
    def _build(self, spec: ModelSpec, diffs: list[str]):
        layers = [keras.Input(shape=tuple(spec.input_shape))]
        for i, layer in enumerate(spec.layers):
            last = i == len(spec.layers) - 1
            if isinstance(layer, Dense):
                act = layer.activation
                if self.native and last and act == "linear" and spec.loss.kind != "sse":
                    act = "sigmoid" if spec.loss.kind == "binary_crossentropy" else "softmax"
                    diffs.append(f"{act} output layer; the loss takes its probabilities (spec: logits)")
                layers.append(keras.layers.Dense(layer.units, activation=act))
            elif isinstance(layer, Conv2D):
                layers.append(keras.layers.Conv2D(layer.filters, tuple(layer.kernel_size), activation=layer.activation,
                                                  padding="valid", data_format="channels_last"))
            elif isinstance(layer, MaxPool2D):
                p = layer.pool_size
                layers.append(keras.layers.MaxPooling2D(pool_size=p, strides=p, padding="valid",
                                                        data_format="channels_last"))
            elif isinstance(layer, Flatten):
                layers.append(keras.layers.Flatten(data_format="channels_last"))
            else:  # pragma: no cover - the spec rejects unknown layers
                raise TypeError(type(layer).__name__)
        return keras.Sequential(layers)

    def _loss(self, spec: ModelSpec, diffs: list[str]):
        kind, red = spec.loss.kind, spec.loss.reduction
        if self.native:  # Keras' defaults: mean over the batch, probabilities in
            if kind != "softmax_crossentropy" and self.np_dtype == np.float64 and demotes_float64():
                diffs.append(f"the loss's mean over output units runs in float32 on {BACKEND} (Keras' ops.mean: "
                             f"result_type(float64) -> float32)")
            if red != "mean":
                diffs.append(f"loss reduced by the mean over the batch (Keras' default; spec {red})")
            if kind == "sse":
                diffs.append("loss 'mse': mean over output units and batch (spec: sum of squared errors)")
                self.info["loss"] = "keras.losses.MeanSquaredError()"
                return keras.losses.MeanSquaredError()
            if kind == "binary_crossentropy":
                diffs.append("BCE on sigmoid probabilities: " + (
                    "Keras on TF switches to the logits path" if BACKEND == "tensorflow"
                    else f"clipped to [{keras.config.epsilon():g}, 1-{keras.config.epsilon():g}]"))
                self.info["loss"] = "keras.losses.BinaryCrossentropy()"
                return keras.losses.BinaryCrossentropy()
            diffs.append("softmax CE on probabilities: " + (
                "Keras on TF switches to the logits path" if BACKEND == "tensorflow"
                else f"clipped to [{keras.config.epsilon():g}, 1-{keras.config.epsilon():g}]"))
            self.info["loss"] = "keras.losses.SparseCategoricalCrossentropy()"
            return keras.losses.SparseCategoricalCrossentropy()
        reduction = "sum" if red == "sum" else "sum_over_batch_size"
        if kind == "sse":
            self.info["loss"] = f"SumSquaredError (sum over units) reduction={reduction!r}"
            return SumSquaredError(reduction=reduction)
        if kind == "binary_crossentropy":
            if self.np_dtype == np.float64 and demotes_float64():
                self.info["loss"] = (f"BinaryCrossentropyFromLogits (ops.binary_crossentropy, sum / units) "
                                     f"reduction={reduction!r}: Keras' own means over units with ops.mean, which "
                                     f"computes in float32 on {BACKEND} (result_type(float64) -> float32)")
                return BinaryCrossentropyFromLogits(reduction=reduction)
            self.info["loss"] = f"keras.losses.BinaryCrossentropy(from_logits=True, reduction={reduction!r})"
            return keras.losses.BinaryCrossentropy(from_logits=True, reduction=reduction)
        self.info["loss"] = f"keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction={reduction!r})"
        return keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=reduction)

    def _optimizer(self, opt, diffs: list[str]):
        if not isinstance(opt, Adam):
            self.info["optimizer"] = f"built-in keras.optimizers.SGD; SGD(learning_rate={fmt(opt.lr)})"
            return keras.optimizers.SGD(learning_rate=opt.lr)
        if self.native:
            o = keras.optimizers.Adam(learning_rate=opt.lr)
            dt = self.options.dtype
            diffs += [d for d in (value_diff("Adam epsilon", float(o.epsilon), opt.epsilon, dt),
                                  value_diff("Adam beta_1", float(o.beta_1), opt.beta1, dt, " (a Python double)"),
                                  value_diff("Adam beta_2", float(o.beta_2), opt.beta2, dt, " (a Python double)"))
                      if d]
            diffs += one_minus_beta_diffs({"beta_1": o.beta_1, "beta_2": o.beta_2}, opt, dt)
            if opt.convention != "eps_hat":
                diffs.append(f"Adam epsilon convention eps_hat (spec {opt.convention})")
            self.info["optimizer"] = f"built-in keras.optimizers.Adam; Adam(learning_rate={fmt(opt.lr)}), defaults otherwise"
            return o
        if opt.convention != "eps_hat":
            raise Unsupported(f"Keras' Adam has the eps_hat convention only (a constant epsilon added to sqrt(v)); the "
                              f"spec's {opt.convention} would need epsilon*sqrt(1-beta_2^t), a new value every step, "
                              f"and Keras bakes its epsilon into the compiled train function")
        self.info["optimizer"] = (f"built-in keras.optimizers.Adam; Adam(learning_rate={fmt(opt.lr)}, "
                                  f"beta_1={opt.beta1!r}, beta_2={opt.beta2!r}, epsilon={opt.epsilon!r})")
        return keras.optimizers.Adam(learning_rate=opt.lr, beta_1=opt.beta1, beta_2=opt.beta2, epsilon=opt.epsilon)

    # -- data -------------------------------------------------------------------------------------------------------
    def _x(self, x):
        if keras.ops.is_tensor(x):  # staged by to_device
            return x
        return np.ascontiguousarray(x, dtype=self.np_dtype)

    def _y(self, y):
        if keras.ops.is_tensor(y):
            return y
        return np.ascontiguousarray(y, dtype=np.int64 if self.spec.loss.integer_labels else self.np_dtype)

    def to_device(self, xs, ys):
        """The batches as backend tensors on the model's device, made before any clock is read."""
        with keras.device(self.device):
            return ([keras.ops.convert_to_tensor(self._x(x)) for x in xs],
                    [keras.ops.convert_to_tensor(self._y(y)) for y in ys])

    # -- training ---------------------------------------------------------------------------------------------------
    def train_step(self, x, y):
        with keras.device(self.device):
            return float(self.model.train_on_batch(self._x(x), self._y(y)))

    def train_steps(self, xs, ys):
        with keras.device(self.device):
            return np.array([float(self.model.train_on_batch(self._x(x), self._y(y))) for x, y in zip(xs, ys)],
                            dtype=np.float64)

    def fit_epoch(self, xs, ys) -> dict:
        """``fit`` for one epoch over the stacked batches ``xs[k]`` (``shuffle=False``, ``batch_size=len(xs[0])``).

        Returns ``{"running_mean": the per-batch logged loss, "losses": per-step losses reconstructed from it as
        (k+1)*m_k - k*m_{k-1}}``.  The reconstruction carries the running mean's rounding times k, relative to the
        mean, not to the step's loss -- measured: Pima float32, batch 10, 200 steps: 2.1e-5 relative (the float32
        loss tolerance is 1e-5); MNIST MLP float64, batch 1, 200 steps: scaled error 1.0 at a step whose loss is ~0.
        So ``train_steps`` uses ``train_on_batch``; the weights after ``fit`` are bit-identical to it (tested).
        """
        n, b = len(xs), len(xs[0])
        x = self._x(np.reshape(xs, (n * b,) + tuple(np.shape(xs)[2:])))
        y = self._y(np.reshape(ys, (n * b,) + tuple(np.shape(ys)[2:])))
        means: list[float] = []

        class Log(keras.callbacks.Callback):
            def on_train_batch_end(self, batch, logs=None):
                means.append(float(logs["loss"]))

        with keras.device(self.device):
            self.model.fit(x, y, batch_size=b, epochs=1, shuffle=False, verbose=0, callbacks=[Log()])
        m = np.array(means, dtype=np.float64)
        k = np.arange(len(m), dtype=np.float64)
        losses = m.copy()
        losses[1:] = (k[1:] + 1) * m[1:] - k[1:] * m[:-1]
        return {"running_mean": m, "losses": losses}

    # -- gradients without an update ----------------------------------------------------------------------------------
    def gradients(self, x, y):
        x, y = self._x(x), self._y(y)
        with keras.device(self.device):
            if BACKEND == "tensorflow":
                loss, grads = self._grads_tf(x, y)
            elif BACKEND == "jax":
                loss, grads = self._grads_jax(x, y)
            else:
                loss, grads = self._grads_torch(x, y)
        return float(loss), [np.array(keras.ops.convert_to_numpy(g), dtype=self.np_dtype) for g in grads]

    def _grads_tf(self, x, y):
        with tf.GradientTape() as tape:
            loss = self.loss_obj(y, self.model(x, training=True))
        return loss, tape.gradient(loss, self.model.trainable_variables)

    def _grads_jax(self, x, y):
        trainable = [v.value for v in self.model.trainable_variables]
        non_trainable = [v.value for v in self.model.non_trainable_variables]

        def f(tv):
            out, _ = self.model.stateless_call(tv, non_trainable, x, training=True)
            return self.loss_obj(y, out)

        return jax.value_and_grad(f)(trainable)

    def _grads_torch(self, x, y):
        params = [v.value for v in self.model.trainable_variables]
        for p in params:
            p.grad = None
        out = self.model(keras.ops.convert_to_tensor(x), training=True)
        loss = self.loss_obj(keras.ops.convert_to_tensor(y), out)
        loss.backward()
        grads = [p.grad.detach().clone() for p in params]
        for p in params:
            p.grad = None  # leave nothing behind for the next train step
        return loss.detach(), grads

    # -- inference ------------------------------------------------------------------------------------------------------
    def predict(self, x):
        with keras.device(self.device):
            out = self.model(keras.ops.convert_to_tensor(self._x(x)), training=False)
            if not self.native:  # the native model already ends in its sigmoid / softmax
                pred = self.spec.loss.prediction
                if pred == "sigmoid":
                    out = keras.ops.sigmoid(out)
                elif pred == "softmax":
                    out = keras.ops.softmax(out, axis=-1)
            return np.asarray(keras.ops.convert_to_numpy(out))

    def get_weights(self):
        return [np.array(w) for w in self.model.get_weights()]

    def sync(self):
        if self.options.device != "cuda":
            return
        if BACKEND == "torch":
            torch.cuda.synchronize()
        elif BACKEND == "jax":
            for v in self.model.variables:
                v.value.block_until_ready()
        elif BACKEND == "tensorflow":
            tf.test.experimental.sync_devices()
