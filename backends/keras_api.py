"""Keras 3, high level: a functional model built from the spec, ``compile``, ``train_on_batch`` / ``fit``.

One module for the three Keras backends; ``KERAS_BACKEND`` (set by the registry in this subprocess's environment)
picks TensorFlow, JAX or torch, and ``keras.backend.backend()`` says which one this process runs.

Layers: every spec layer is looked up in ``LAYER_BUILDERS`` (Dense, Conv2D, MaxPooling2D, Flatten, Activation,
BatchNormalization, Dropout), the optimizer in ``OPTIMIZER_BUILDERS``; a type missing there raises ``Unsupported``
before anything is built.  Weights and state are bound by their spec role: a ``ParamSpec`` role (kernel, bias, gamma,
beta, moving_mean, moving_variance) is the name of the Keras layer's attribute holding it.

Layouts: Keras 3 (channels_last) takes the canonical arrays as they are: Dense kernels ``(in, out)``, Conv2D kernels
HWIO, NHWC activations and ``Flatten`` in (h, w, c) order, on every Keras backend; the variables are assigned and read
unchanged (shapes are checked against the spec first).

Aligned mode: the last layer stays linear and the losses are Keras' own from logits --
``BinaryCrossentropy(from_logits=True)``, ``SparseCategoricalCrossentropy(from_logits=True)`` -- or, for the spec's sum
of squared errors, a small ``keras.losses.Loss`` summing over the output units (``MeanSquaredError`` would *mean* over
them); reduction ``"sum"`` or ``"sum_over_batch_size"`` per the spec.  The optimizers are the built-in ``keras.optimizers.SGD``
and ``keras.optimizers.Adam`` with the spec's hyperparameters (floatx is the run's dtype, so the learning-rate variable
is too).  Keras' Adam (``keras/src/optimizers/adam.py``) is the eps_hat form in the oracle's order; it has no
``eps_v_hat`` form, and its epsilon is a Python constant baked into the compiled train function, so a spec asking for
``eps_v_hat`` raises ``Unsupported`` rather than running something else.  ``info["optimizer"]`` says
``"built-in keras.optimizers.Adam; ..."``.
BatchNorm (aligned): ``keras.layers.BatchNormalization(momentum=spec.momentum, epsilon=spec.epsilon)``.  Its source
(``keras/src/layers/normalization/batch_normalization.py``, ``call``) is the spec's: batch mean and *biased* variance
(``ops.moments``), ``moving = moving * momentum + batch_stat * (1.0 - momentum)`` (the oracle's order), the momentum a
Python double (the spec's is float32-exact, and ``1 - momentum`` is then exact in float32 too).  Two cases it cannot
be configured for use :class:`SpecBatchNorm`, the same layer with ``call`` written in the input's dtype: a spec with
``unbiased_moving_variance`` (Keras stores the biased variance), and float64 on JAX / torch, where the built-in computes
in ``backend.result_type(dtype, "float32")`` -- float32 there in Keras 3.15.1 (measured: 1e-7 off in float64).
``info["batchnorm"]`` says which ran.
Dropout (aligned): the harness's masks (:meth:`ModelBase.dropout_masks`) enter the functional model as extra inputs,
one per Dropout layer (``[x, mask_0, ...]``), and :class:`MaskDropout` multiplies by its mask in training and passes
through in inference; ``train_on_batch`` / ``fit`` get step t's masks with step t's batch (one trace, masks are data).
Native mode is what a Keras user writes: sigmoid / softmax output with ``BinaryCrossentropy()`` /
``SparseCategoricalCrossentropy()`` on probabilities, ``"mse"`` for a squared error, ``Adam(learning_rate=...)``,
``BatchNormalization()`` (momentum 0.99, epsilon 1e-3 as Python doubles, biased variance stored) and
``Dropout(rate)`` (masks from Keras' seed generator) with their defaults; ``info["native_differences"]`` lists what
differs from the spec.  Initial weights are still the canonical ones.

Training: ``train_step`` and ``train_steps`` call ``train_on_batch``, which returns each step's own loss.  ``fit`` only
logs a running mean per epoch, from which per-step losses come back only approximately -- not within the harness's
tolerances (see :meth:`Model.fit_epoch`); ``fit`` and a ``train_on_batch`` loop over the same batches give
bit-identical weights (tested).
Gradients (no update) use each backend's autodiff on the Keras model in training mode: ``tf.GradientTape``
(tensorflow), ``model.stateless_call`` + ``jax.value_and_grad`` (jax), ``loss.backward()`` on zeroed grads (torch);
the non-trainable variables (BatchNorm statistics, seed generators) are put back afterwards on tensorflow / torch
(JAX's stateless call discards them), so ``gradients`` moves nothing.

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

from models.spec import SGD, Activation, Adam, BatchNorm, Conv2D, Dense, Dropout, Flatten, MaxPool2D, ModelSpec, init_state  # noqa: E402

from .base import BuildOptions, Capabilities, ModelBase, Unsupported, fmt, lookup, one_minus_beta_diffs, value_diff  # noqa: E402

BACKEND = keras.backend.backend()
NAME = {"tensorflow": "keras", "jax": "keras-jax", "torch": "keras-torch"}.get(BACKEND, f"keras-{BACKEND}")

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




# ----------------------------------------------------------------------------------------------------- custom layers
class MaskDropout(keras.layers.Layer):
    """Aligned dropout: ``x * mask`` in training, ``x`` in inference; the mask is a model input (the harness's)."""

    def call(self, inputs, training=None):
        x, mask = inputs
        return x * keras.ops.cast(mask, x.dtype) if training else x

    def compute_output_shape(self, input_shape):
        return input_shape[0]


class SpecBatchNorm(keras.layers.BatchNormalization):
    """``keras.layers.BatchNormalization`` (same variables, same formulas, same ``ops.moments`` /
    ``ops.batch_normalization``) with its arithmetic in the input's dtype, and optionally the unbiased batch variance
    (times n / (n - 1), n = values per feature in the batch) stored in ``moving_variance``: for the spec's cases the
    built-in cannot be configured for (float64 on JAX / torch: the built-in casts to ``result_type(dtype, float32)``)."""

    def __init__(self, unbiased_moving_variance: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.unbiased_moving_variance = unbiased_moving_variance

    def call(self, inputs, training=None, mask=None):
        ops = keras.ops
        dtype = inputs.dtype
        moving_mean = ops.cast(self.moving_mean, dtype)
        moving_variance = ops.cast(self.moving_variance, dtype)
        if training and self.trainable:
            axes = list(range(len(inputs.shape) - 1))
            mean, variance = ops.moments(inputs, axes)
            stored = variance
            if self.unbiased_moving_variance:
                n = ops.sum(ops.ones_like(inputs[..., 0]))  # values per feature; exact, and dynamic batch sizes work
                factor = ops.where(n > 1, n / ops.maximum(n - 1, 1), ops.ones_like(n))
                stored = variance * factor
            self.moving_mean.assign(moving_mean * self.momentum + mean * (1.0 - self.momentum))
            self.moving_variance.assign(moving_variance * self.momentum + stored * (1.0 - self.momentum))
        else:
            mean, variance = moving_mean, moving_variance
        return ops.batch_normalization(x=inputs, mean=mean, variance=variance, axis=self.axis,
                                       offset=ops.cast(self.beta, dtype), scale=ops.cast(self.gamma, dtype),
                                       epsilon=self.epsilon)


# ------------------------------------------------------------------------------------------------------ the tables
# A layer builder: (model, layer, index, keras tensor in) -> (keras tensor out, the Keras layer holding its variables
# or None).  An optimizer builder: (model, optimizer spec, diffs) -> the Keras optimizer.
def _dense(m, layer, i, h):
    k = keras.layers.Dense(layer.units, activation=layer.activation, use_bias=layer.use_bias)
    return k(h), k


def _conv(m, layer, i, h):
    k = keras.layers.Conv2D(layer.filters, tuple(layer.kernel_size), activation=layer.activation, padding="valid",
                            use_bias=layer.use_bias, data_format="channels_last")
    return k(h), k


def _pool(m, layer, i, h):
    p = layer.pool_size
    return keras.layers.MaxPooling2D(pool_size=p, strides=p, padding="valid", data_format="channels_last")(h), None


def _flatten(m, layer, i, h):
    return keras.layers.Flatten(data_format="channels_last")(h), None


def _activation(m, layer, i, h):
    return keras.layers.Activation(layer.activation)(h), None


def _batchnorm(m, layer, i, h):
    dt = m.options.dtype
    if m.native:
        k = keras.layers.BatchNormalization()
        m.diffs += [d for d in (value_diff("BatchNorm momentum", k.momentum, layer.momentum, dt, " (a Python double)"),
                                value_diff("BatchNorm epsilon", k.epsilon, layer.epsilon, dt, " (a Python double)"))
                    if d]
        if dt == "float32" and np.float32(1.0 - k.momentum) != np.float32(1.0) - np.float32(layer.momentum):
            m.diffs.append(f"1 - BatchNorm momentum from the Python double {k.momentum!r}: "
                           f"{np.float32(1.0 - k.momentum):.9g} (spec, in float32: "
                           f"{np.float32(1.0) - np.float32(layer.momentum):.9g})")
        if layer.unbiased_moving_variance:
            m.diffs.append("BatchNorm stores the batch's biased variance in moving_variance (spec: unbiased, n/(n-1))")
        if dt == "float64" and demotes_float64():
            m.diffs.append(f"BatchNorm computes in float32 on {BACKEND} (Keras casts to result_type(float64, float32) "
                           f"-> float32)")
        m.bn_used.add("keras.layers.BatchNormalization() with its defaults")
        return k(h), k
    reasons = []
    if layer.unbiased_moving_variance:
        reasons.append("unbiased moving variance (the built-in stores the biased one)")
    if dt == "float64" and demotes_float64():
        reasons.append(f"float64 (the built-in computes in result_type(float64, float32) = float32 on {BACKEND})")
    kw = dict(momentum=layer.momentum, epsilon=layer.epsilon)
    if reasons:
        k = SpecBatchNorm(unbiased_moving_variance=layer.unbiased_moving_variance, **kw)
        m.bn_used.add(f"SpecBatchNorm (BatchNormalization's call in the input's dtype) for {' and '.join(reasons)}")
    else:
        k = keras.layers.BatchNormalization(**kw)
        m.bn_used.add("built-in keras.layers.BatchNormalization(momentum=spec, epsilon=spec)")
    return k(h), k


def _dropout(m, layer, i, h):
    if m.native:
        m.diffs.append("Dropout masks from torch's global RNG (Keras' unseeded Dropout on torch calls "
                       "torch.nn.functional.dropout): trajectories not comparable" if BACKEND == "torch" else
                       "Dropout masks from Keras' RNG (seed generator): trajectories not comparable")
        return keras.layers.Dropout(layer.rate)(h), None
    mask = keras.Input(shape=tuple(h.shape[1:]), name=f"dropout{i}_mask")
    m.mask_inputs.append(mask)
    return MaskDropout()([h, mask]), None


LAYER_BUILDERS = {
    Dense: _dense,
    Conv2D: _conv,
    MaxPool2D: _pool,
    Flatten: _flatten,
    Activation: _activation,
    BatchNorm: _batchnorm,
    Dropout: _dropout,
}


def _sgd(m, opt, diffs):
    m.info["optimizer"] = f"built-in keras.optimizers.SGD; SGD(learning_rate={fmt(opt.lr)})"
    return keras.optimizers.SGD(learning_rate=opt.lr)


def _adam(m, opt, diffs):
    if m.native:
        o = keras.optimizers.Adam(learning_rate=opt.lr)
        dt = m.options.dtype
        diffs += [d for d in (value_diff("Adam epsilon", float(o.epsilon), opt.epsilon, dt),
                              value_diff("Adam beta_1", float(o.beta_1), opt.beta1, dt, " (a Python double)"),
                              value_diff("Adam beta_2", float(o.beta_2), opt.beta2, dt, " (a Python double)"))
                  if d]
        diffs += one_minus_beta_diffs({"beta_1": o.beta_1, "beta_2": o.beta_2}, opt, dt)
        if opt.convention != "eps_hat":
            diffs.append(f"Adam epsilon convention eps_hat (spec {opt.convention})")
        m.info["optimizer"] = f"built-in keras.optimizers.Adam; Adam(learning_rate={fmt(opt.lr)}), defaults otherwise"
        return o
    if opt.convention != "eps_hat":
        raise Unsupported(f"Keras' Adam has the eps_hat convention only (a constant epsilon added to sqrt(v)); the "
                          f"spec's {opt.convention} would need epsilon*sqrt(1-beta_2^t), a new value every step, "
                          f"and Keras bakes its epsilon into the compiled train function")
    m.info["optimizer"] = (f"built-in keras.optimizers.Adam; Adam(learning_rate={fmt(opt.lr)}, "
                           f"beta_1={opt.beta1!r}, beta_2={opt.beta2!r}, epsilon={opt.epsilon!r})")
    return keras.optimizers.Adam(learning_rate=opt.lr, beta_1=opt.beta1, beta_2=opt.beta2, epsilon=opt.epsilon)


OPTIMIZER_BUILDERS = {SGD: _sgd, Adam: _adam}


# ------------------------------------------------------------------------------------------------------- the model
class Model(ModelBase):
    capabilities = CAPABILITIES

    def __init__(self, spec: ModelSpec, weights: list[np.ndarray], options: BuildOptions) -> None:
        builders = [lookup(LAYER_BUILDERS, layer, NAME) for layer in spec.layers]  # before any work
        opt_builder = lookup(OPTIMIZER_BUILDERS, spec.optimizer, NAME)
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
        self.t = 0  # updates applied so far: the step whose dropout masks the next update uses
        self.diffs: list[str] = []
        self.mask_inputs: list = []
        self.bn_used: set[str] = set()

        with keras.device(self.device):
            self.model, klayers = self._build(spec, builders)
            self._weight_vars = self._bind(spec.param_entries(), klayers, "weight")
            self._state_vars = self._bind(spec.state_entries(), klayers, "state")
            if len(self.model.trainable_variables) != len(self._weight_vars):
                raise ValueError(f"{spec.name}: the Keras model has {len(self.model.trainable_variables)} trainable "
                                 f"variables, the spec {len(self._weight_vars)} weights")
            for v, w in zip(self._weight_vars, weights):
                v.assign(np.asarray(w, self.np_dtype))
            for v, s in zip(self._state_vars, init_state(spec)):
                v.assign(np.asarray(s, self.np_dtype))
            if BACKEND == "torch" and not all(v.value.is_leaf for v in self.model.trainable_variables):
                raise RuntimeError("Keras on torch made non-leaf variables: autograd would give them no gradients")
            self.loss_obj = self._loss(spec, self.diffs)
            self.optimizer = opt_builder(self, spec.optimizer, self.diffs)
            jit = True if options.fast else "auto"
            self.model.compile(optimizer=self.optimizer, loss=self.loss_obj, jit_compile=jit)
            self.info["jit_compile"] = bool(self.model.jit_compile)
        if self.bn_used:
            self.info["batchnorm"] = "; ".join(sorted(self.bn_used))
        if spec.random_layers:
            rng = "torch.nn.functional.dropout, torch's global RNG" if BACKEND == "torch" else "Keras' seed generator"
            self.info["dropout"] = (f"keras.layers.Dropout(rate): {rng}" if self.native else
                                    "MaskDropout: the harness's masks as model inputs [x, mask_0, ...]")
        if self.native:
            self.info["native_differences"] = list(dict.fromkeys(self.diffs))

    # -- building ---------------------------------------------------------------------------------------------------
    def _build(self, spec: ModelSpec, builders):
        """The functional model ``[x, *dropout masks] -> output`` and, per spec layer, the Keras layer holding its
        variables (None for layers without)."""
        x = keras.Input(shape=tuple(spec.input_shape), name="x")
        h, klayers = x, []
        for i, (layer, build) in enumerate(zip(spec.layers, builders)):
            h, k = build(self, layer, i, h)
            klayers.append(k)
        if self.native and spec.loss.kind != "sse":  # what a Keras user writes: the output layer's own activation
            act = "sigmoid" if spec.loss.kind == "binary_crossentropy" else "softmax"
            self.diffs.append(f"{act} output layer; the loss takes its probabilities (spec: logits)")
            h = keras.layers.Activation(act)(h)
        return keras.Model([x, *self.mask_inputs] if self.mask_inputs else x, h), klayers

    def _bind(self, entries, klayers, what: str):
        """The Keras variables of the spec's entries, in spec order: a role is the Keras layer's attribute name."""
        out = []
        for i, layer, p in entries:
            v = getattr(klayers[i], p.role, None) if klayers[i] is not None else None
            if v is None:
                raise ValueError(f"{self.spec.name}: layer {i} ({type(layer).__name__}) has no Keras variable for "
                                 f"its {what} {p.name!r}")
            if tuple(v.shape) != tuple(p.shape):
                raise ValueError(f"{self.spec.name}: layer {i} {p.name} has Keras shape {tuple(v.shape)}, the spec "
                                 f"{p.shape}")
            out.append(v)
        return out

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

    # -- data -------------------------------------------------------------------------------------------------------
    def _x(self, x):
        if keras.ops.is_tensor(x):  # staged by to_device
            return x
        return np.ascontiguousarray(x, dtype=self.np_dtype)

    def _y(self, y):
        if keras.ops.is_tensor(y):
            return y
        return np.ascontiguousarray(y, dtype=np.int64 if self.spec.loss.integer_labels else self.np_dtype)

    def _inputs(self, x, step: int | None):
        """The model's inputs for a batch: ``x`` alone, or ``[x, *masks]`` with training step ``step``'s dropout masks
        (``None``: inference, ones; MaskDropout ignores them there)."""
        x = self._x(x)
        if not self.mask_inputs:
            return x
        b = int(x.shape[0])
        if step is None:
            masks = [np.ones((b, *s), self.np_dtype) for s in (self.spec.input_shapes()[i]
                                                                for i in self.spec.random_layers)]
        else:
            masks = self.dropout_masks(step, b, self.np_dtype)
        if keras.ops.is_tensor(x):  # x staged by to_device: Keras on torch refuses a list mixing tensors and arrays
            masks = [keras.ops.convert_to_tensor(a) for a in masks]
        return [x, *masks]

    def to_device(self, xs, ys):
        """The batches as backend tensors on the model's device, made before any clock is read."""
        with keras.device(self.device):
            return ([keras.ops.convert_to_tensor(self._x(x)) for x in xs],
                    [keras.ops.convert_to_tensor(self._y(y)) for y in ys])

    # -- training ---------------------------------------------------------------------------------------------------
    def train_step(self, x, y):
        with keras.device(self.device):
            loss = float(self.model.train_on_batch(self._inputs(x, self.t), self._y(y)))
        self.t += 1
        return loss

    def train_steps(self, xs, ys):
        return np.array([self.train_step(x, y) for x, y in zip(xs, ys)], dtype=np.float64)

    def fit_epoch(self, xs, ys) -> dict:
        """``fit`` for one epoch over the stacked batches ``xs[k]`` (``shuffle=False``, ``batch_size=len(xs[0])``),
        with the dropout masks of steps t..t+k-1 stacked the same way.

        Returns ``{"running_mean": the per-batch logged loss, "losses": per-step losses reconstructed from it as
        (k+1)*m_k - k*m_{k-1}}``.  The reconstruction carries the running mean's rounding times k, relative to the
        mean, not to the step's loss -- measured: Pima float32, batch 10, 200 steps: 2.1e-5 relative (the float32
        loss tolerance is 1e-5); MNIST MLP float64, batch 1, 200 steps: scaled error 1.0 at a step whose loss is ~0.
        So ``train_steps`` uses ``train_on_batch``; the weights after ``fit`` are bit-identical to it (tested).
        """
        n, b = len(xs), len(xs[0])
        x = self._x(np.reshape(xs, (n * b,) + tuple(np.shape(xs)[2:])))
        y = self._y(np.reshape(ys, (n * b,) + tuple(np.shape(ys)[2:])))
        if self.mask_inputs:
            per_step = [self.dropout_masks(self.t + k, b, self.np_dtype) for k in range(n)]
            x = [x, *(np.concatenate([m[j] for m in per_step]) for j in range(len(self.mask_inputs)))]
        means: list[float] = []

        class Log(keras.callbacks.Callback):
            def on_train_batch_end(self, batch, logs=None):
                means.append(float(logs["loss"]))

        with keras.device(self.device):
            self.model.fit(x, y, batch_size=b, epochs=1, shuffle=False, verbose=0, callbacks=[Log()])
        self.t += n
        m = np.array(means, dtype=np.float64)
        k = np.arange(len(m), dtype=np.float64)
        losses = m.copy()
        losses[1:] = (k[1:] + 1) * m[1:] - k[1:] * m[:-1]
        return {"running_mean": m, "losses": losses}

    # -- gradients without an update ----------------------------------------------------------------------------------
    def gradients(self, x, y):
        with keras.device(self.device):
            inputs, y = self._inputs(x, self.t), self._y(y)
            if BACKEND == "jax":  # stateless: the new non-trainable values are discarded
                loss, grads = self._grads_jax(inputs, y)
            else:
                saved = [np.array(keras.ops.convert_to_numpy(v.value)) for v in self.model.non_trainable_variables]
                rng = self._torch_rng() if BACKEND == "torch" and self.native and self.spec.random_layers else None
                try:
                    loss, grads = self._grads_tf(inputs, y) if BACKEND == "tensorflow" else self._grads_torch(inputs, y)
                finally:  # the training-mode pass moved BatchNorm's statistics and the seed generators: put them back
                    for v, s in zip(self.model.non_trainable_variables, saved):
                        v.assign(s)
                    if rng is not None:  # native dropout on torch draws from torch's global generator
                        self._torch_rng(rng)
        return float(loss), [np.array(keras.ops.convert_to_numpy(g), dtype=self.np_dtype) for g in grads]

    def _torch_rng(self, state=None):
        """torch's global RNG state (CPU, and CUDA on a GPU run), or with ``state`` put it back."""
        cuda = self.options.device == "cuda"
        if state is None:
            return torch.get_rng_state(), torch.cuda.get_rng_state() if cuda else None
        torch.set_rng_state(state[0])
        if cuda:
            torch.cuda.set_rng_state(state[1])
        return None

    def _grads_tf(self, inputs, y):
        with tf.GradientTape() as tape:
            loss = self.loss_obj(y, self.model(inputs, training=True))
        return loss, tape.gradient(loss, self._weight_vars)

    def _grads_jax(self, inputs, y):
        tvars = self.model.trainable_variables
        trainable = [v.value for v in tvars]
        non_trainable = [v.value for v in self.model.non_trainable_variables]

        def f(tv):
            out, _ = self.model.stateless_call(tv, non_trainable, inputs, training=True)
            return self.loss_obj(y, out)

        loss, grads = jax.value_and_grad(f)(trainable)
        index = {id(v): k for k, v in enumerate(tvars)}
        return loss, [grads[index[id(v)]] for v in self._weight_vars]

    def _grads_torch(self, inputs, y):
        params = [v.value for v in self._weight_vars]
        for p in params:
            p.grad = None
        if isinstance(inputs, list):
            inputs = [keras.ops.convert_to_tensor(a) for a in inputs]
        else:
            inputs = keras.ops.convert_to_tensor(inputs)
        out = self.model(inputs, training=True)
        loss = self.loss_obj(keras.ops.convert_to_tensor(y), out)
        loss.backward()
        grads = [p.grad.detach().clone() for p in params]
        for p in params:
            p.grad = None  # leave nothing behind for the next train step
        return loss.detach(), grads

    # -- inference ------------------------------------------------------------------------------------------------------
    def predict(self, x):
        with keras.device(self.device):
            inputs = self._inputs(x, None)
            if isinstance(inputs, list):
                inputs = [keras.ops.convert_to_tensor(a) for a in inputs]
            else:
                inputs = keras.ops.convert_to_tensor(inputs)
            out = self.model(inputs, training=False)
            if not self.native:  # the native model already ends in its sigmoid / softmax
                pred = self.spec.loss.prediction
                if pred == "sigmoid":
                    out = keras.ops.sigmoid(out)
                elif pred == "softmax":
                    out = keras.ops.softmax(out, axis=-1)
            return np.asarray(keras.ops.convert_to_numpy(out))

    def get_weights(self):
        return [np.array(keras.ops.convert_to_numpy(v.value)) for v in self._weight_vars]

    def get_state(self):
        return [np.array(keras.ops.convert_to_numpy(v.value), dtype=self.np_dtype) for v in self._state_vars]

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
