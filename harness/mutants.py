"""Planted-bug copies of the NumPy backend for ``harness selftest`` (a backend module: same contract).

``DLCOMPARE_MUTANT=<bug>`` picks the bug; ``none`` is the clean copy.  Each bug is one a real port makes.
"""

from __future__ import annotations

import dataclasses
import os
from decimal import Decimal

import numpy as np

from backends import numpy_scratch
from backends.base import Unsupported
from backends.numpy_scratch import CAPABILITIES, devices, probe  # noqa: F401  (the backend contract)
from models.spec import SGD, Adam, AdamW, Conv2D, Flatten, Loss, f32

WEIGHT_DECAY = 1e-4  # the AdamW paper's decoupled form at schedule multiplier 1: w -= lambda * w
LR_DECAY_RATE, LR_DECAY_STEPS = 0.9, 10
LR_TYPO = 10  # lr_typo: the learning rate divided by this (a zero too many after the point)

BUGS = {
    "adam_eps": "Adam epsilon 10x the spec's",
    "adam_convention": "Adam epsilon added to sqrt(v_hat) (torch/optax) instead of the spec's eps-hat form",
    "transposed_weight": "a square kernel loaded transposed (and exported transposed back)",
    "bias_frozen": "biases never updated",
    "reduction": "sum over the batch instead of the mean (or the mean instead of the sum)",
    "gradient_sign": "the sign of one gradient (the last bias) flipped",
    "batch_shift": "batch order shifted by one step (trains on the previous batch)",
    "float32_loss": "the loss and its gradient accumulated in float32 in a float64 run",
    "stale_state": "Adam's second moment never updated after step 2 (stale optimizer state)",
    "weight_decay": f"decoupled weight decay {WEIGHT_DECAY:g} left on (w -= {WEIGHT_DECAY:g}*w after each update, AdamW)",
    "lr_decay": f"an exponential learning-rate decay left on (lr * {LR_DECAY_RATE:g}^(t/{LR_DECAY_STEPS}), Keras' "
                "ExponentialDecay, t = updates already applied)",
    "bn_momentum_convention": "BatchNorm momentum taken in the other convention (torch's 0.1 where Keras' 0.99 means "
                              "the same): the moving statistics follow the last batch",
    "predict_training_mode": "predictions in training mode (torch without model.eval()): BatchNorm on the batch's "
                             "statistics, dropout on",
    "dropout_unscaled": "dropout without the 1/(1-rate) scaling at train time (not inverted dropout)",
    "loss_halved": "the loss and its gradient half the spec's (a 1/2 in front of the loss, as in 1/2 * squared error)",
    "lr_typo": f"the learning rate 1/{LR_TYPO} of the spec's (1e-4 typed for 1e-3)",
    "adam_bias_step": "Adam's bias correction one step ahead: 1 - beta^(t+1) where the spec has 1 - beta^t",
    "adam_betas_swapped": "Adam's beta1 and beta2 swapped",
    "conv_kernel_transposed": "the first square conv kernel loaded with its spatial axes swapped (OIHW -> HWIO written "
                              "permute(3, 2, 1, 0)), exported back the same way",
    "flatten_chw": "Flatten in (c, h, w) order (torch's) where the spec has (h, w, c), the dense kernel after it as given",
    "softmax_axis": "the softmax (loss, its gradient, predictions) over the batch axis instead of the classes",
    "state_reset": "the optimizer re-created before every update (its state fresh each step: Adam's t = 1, zero "
                   "moments and momentum, accumulators at their initial value)",
    "activation_missing": "the first hidden non-linearity left out (the identity in forward and backward)",
}
# bug -> the hypothesis of the diagnosis (harness/diagnose.py) that must name it
CAUSE = {
    "adam_eps": "adam_epsilon",
    "adam_convention": "adam_convention",
    "transposed_weight": "kernel_layout",
    "bias_frozen": "frozen_tensor",
    "reduction": "reduction",
    "gradient_sign": "gradient_sign",
    "batch_shift": "batch_order",
    "float32_loss": "float32_inside",
    "stale_state": "stale_optimizer_state",
    "weight_decay": "weight_decay",
    "lr_decay": "lr_schedule",
    "bn_momentum_convention": "bn_momentum",
    "predict_training_mode": "predict_training_mode",
    "dropout_unscaled": "dropout_scaling",
    "loss_halved": "loss_factor",
    "lr_typo": "learning_rate",
    "adam_bias_step": "adam_bias_correction",
    "adam_betas_swapped": "adam_betas",
    "conv_kernel_transposed": "kernel_layout",
    "flatten_chw": "flatten_order",
    "softmax_axis": "softmax_axis",
    "state_reset": "optimizer_state_reset",
    "activation_missing": "activation",
}
NEEDS = {  # bug -> (what the model must have, the test): n/a on models without it
    "bn_momentum_convention": ("a BatchNorm layer", lambda spec: bool(spec.couples_batch)),
    "predict_training_mode": ("a BatchNorm or Dropout layer", lambda spec: bool(spec.couples_batch or spec.random_layers)),
    "dropout_unscaled": ("a Dropout layer", lambda spec: bool(spec.random_layers)),
}

# (bug, batch size) where the bug computes the very same numbers as the spec: not a miss when it passes
IDENTICAL_AT = {("reduction", 1): "the sum and the mean of one sample are the same number"}

BUG = os.environ.get("DLCOMPARE_MUTANT", "none")


# ------------------------------------------------------------------------- the maths the new planted bugs get wrong
def _flatten_chw_fwd(ctx, layer, params, state, x, training, i):
    """torch's flatten of an NCHW tensor, written for the NHWC activations: (c, h, w) order."""
    return x.transpose(0, 3, 1, 2).reshape(x.shape[0], -1), (x.shape,), None


def _flatten_chw_bwd(ctx, layer, params, cache, dout, need_dx):
    n, h, w, c = cache[0]
    return dout.reshape(n, c, h, w).transpose(0, 2, 3, 1), []


def _forward(model, x, keep, training, ctx):
    """``numpy_scratch.forward`` with the model's own layers (``model.swapped``: layer index -> the bug's pair)."""
    return numpy_scratch.forward(model.xp, model.spec, model.params, x, keep=keep, state=model.state,
                                 training=training, ctx=ctx, overrides=model.swapped)


def _backward(model, caches, dout, ctx):
    """``numpy_scratch.backward`` with the model's own layers."""
    return numpy_scratch.backward(model.xp, model.spec, model.params, caches, dout, ctx=ctx, overrides=model.swapped)


def _softmax_ce_batch_axis(xp, spec, out, y):
    """softmax_crossentropy with the (log-)softmax over axis 0, the batch (``log_softmax(logits, dim=0)``), and the
    true gradient of that loss, as autograd gives it: with p the batch-axis softmax and w_i sample i's class weight,
    d(-sum_i w_i log p[i, y_i]) / d z[j, k] = p[j, k] * sum_{i: y_i = k} w_i - w_j [y_j = k].  At batch 1 every p is 1:
    the loss and its gradient are 0."""
    n = out.shape[0]
    logp = numpy_scratch._log_softmax(xp, out.T).T
    rows = xp.arange(n)
    w = (xp.asarray(np.asarray(spec.loss.class_weights, dtype=out.dtype))[y] if spec.loss.class_weights
         else xp.ones(n, dtype=out.dtype))
    per_sample = -logp[rows, y] * w
    picked = xp.zeros_like(out)
    picked[rows, y] = w
    grad = xp.exp(logp) * picked.sum(axis=0) - picked
    if spec.loss.reduction == "mean":
        return per_sample.mean(), grad / n
    return per_sample.sum(), grad


def _adam_bias_step(model, grads):
    """``numpy_scratch._adam`` (and ``_adamw``'s decay first) with the bias correction's step count one ahead."""
    xp, opt, dt = model.xp, model.spec.optimizer, model.dtype.type
    lr = numpy_scratch._lr(model)
    if isinstance(opt, AdamW):
        decay = dt(opt.weight_decay) * (lr if opt.decay_times_lr else dt(1))
        for p in model.params:
            p -= decay * p
    b1, b2, eps = dt(opt.beta1), dt(opt.beta2), dt(opt.epsilon)
    t = dt(model.t + 1)  # the bug: the spec's t is model.t (1 at the first update)
    b1t, b2t = b1**t, b2**t
    alpha = lr * xp.sqrt(1 - b2t) / (1 - b1t)
    for p, m, v, g in zip(model.params, model.m, model.v, grads):
        m += (g - m) * (1 - b1)
        v += (g * g - v) * (1 - b2)
        if opt.convention == "eps_hat":
            p -= (m * alpha) / (xp.sqrt(v) + eps)
        else:
            p -= lr * (m / (1 - b1t)) / (xp.sqrt(v / (1 - b2t)) + eps)


def first_hidden_nonlinearity(spec) -> int | None:
    """The index of the first layer before the last that applies a non-linear activation (a Dense / Conv2D with one,
    or an Activation layer): what activation_missing leaves out."""
    for i, layer in enumerate(spec.layers[:-1]):
        if getattr(layer, "activation", "linear") != "linear":
            return i
    return None


def chw_flattens(spec) -> list[int]:
    """The Flatten layers whose (h, w, c) input has more than one channel and more than one pixel: where the (c, h, w)
    order is another order."""
    return [i for i, (layer, s) in enumerate(zip(spec.layers, spec.input_shapes()))
            if isinstance(layer, Flatten) and len(s) == 3 and s[2] > 1 and s[0] * s[1] > 1]


def square_conv_kernel(spec) -> int | None:
    """The parameter index of the first Conv2D kernel with kh == kw > 1."""
    for j, (_, layer, p) in enumerate(spec.param_entries()):
        if isinstance(layer, Conv2D) and p.role == "kernel" and layer.kernel_size[0] == layer.kernel_size[1] > 1:
            return j
    return None


class Model(numpy_scratch.Model):
    def __init__(self, spec, weights, options):
        if BUG not in BUGS and BUG != "none":
            raise ValueError(f"unknown planted bug {BUG!r}; valid: none, {', '.join(BUGS)}")
        opt = spec.optimizer
        if BUG in ("adam_eps", "adam_convention", "stale_state") and not isinstance(opt, Adam):
            raise Unsupported(f"bug {BUG} needs an Adam model")
        if BUG == "float32_loss" and options.dtype != "float64":
            raise Unsupported("bug float32_loss (float32 inside a float64 run) means nothing in a float32 run")
        if BUG in NEEDS and not NEEDS[BUG][1](spec):
            raise Unsupported(f"bug {BUG} needs {NEEDS[BUG][0]}")
        if BUG == "bias_frozen" and not any(p.role == "bias" for _, _, p in spec.param_entries()):
            raise Unsupported("bug bias_frozen needs a model with biases")
        if BUG == "bn_momentum_convention":
            layers = tuple(dataclasses.replace(layer, momentum=f32(1 - layer.momentum)) if layer.couples_batch else layer
                           for layer in spec.layers)
            spec = dataclasses.replace(spec, layers=layers)
        if BUG == "adam_eps":
            spec = dataclasses.replace(spec, optimizer=dataclasses.replace(opt, epsilon=f32(opt.epsilon * 10)))
        elif BUG == "adam_convention":
            other = "eps_v_hat" if opt.convention == "eps_hat" else "eps_hat"
            spec = dataclasses.replace(spec, optimizer=dataclasses.replace(opt, convention=other))
        elif BUG == "reduction":
            other = "sum" if spec.loss.reduction == "mean" else "mean"
            spec = dataclasses.replace(spec, loss=Loss(spec.loss.kind, other))
        spec = self._new_bug_spec(spec)
        super().__init__(spec, weights, options)
        self.base_spec = spec
        self.transposed = None
        self.axes = (1, 0)  # the layout mistake's permutation of the transposed kernel (its own inverse)
        if BUG == "transposed_weight":
            square = [j for j, (_, _, p) in enumerate(spec.param_entries())
                      if p.role == "kernel" and len(p.shape) == 2 and p.shape[0] == p.shape[1]]
            if not square:
                raise Unsupported("bug transposed_weight needs a square dense kernel (mnist_mlp has one)")
            self.transposed = square[0]
            self.params[self.transposed] = self.params[self.transposed].T.copy()
        if BUG == "conv_kernel_transposed":
            self.transposed, self.axes = square_conv_kernel(spec), (1, 0, 2, 3)  # HWIO read as WHIO
            self.params[self.transposed] = self.params[self.transposed].transpose(self.axes).copy()
        if BUG == "adam_bias_step":
            self._update = _adam_bias_step
        self.swapped = {i: (_flatten_chw_fwd, _flatten_chw_bwd) for i in chw_flattens(spec)} if BUG == "flatten_chw" \
            else {}
        self.previous = None

    @staticmethod
    def _new_bug_spec(spec):
        """The applicability checks of the bugs added with the diagnosis (issue 14), and the spec as the buggy port
        builds it where the bug is a wrong number or a missing piece of its definition."""
        opt = spec.optimizer
        if BUG in ("adam_bias_step", "adam_betas_swapped") and not isinstance(opt, Adam):
            raise Unsupported(f"bug {BUG} needs an Adam model")
        if BUG == "adam_betas_swapped" and opt.beta1 == opt.beta2:
            raise Unsupported("bug adam_betas_swapped: beta1 == beta2, swapped they are the same")
        if BUG == "conv_kernel_transposed" and square_conv_kernel(spec) is None:
            raise Unsupported("bug conv_kernel_transposed needs a Conv2D with a square kernel larger than 1x1")
        if BUG == "flatten_chw" and not chw_flattens(spec):
            raise Unsupported("bug flatten_chw needs a Flatten of an input with more than one channel and pixel")
        if BUG == "softmax_axis" and spec.loss.prediction != "softmax":
            raise Unsupported("bug softmax_axis needs a softmax prediction (softmax_crossentropy)")
        if BUG == "state_reset" and isinstance(opt, SGD) and opt.momentum == 0:
            raise Unsupported("bug state_reset needs an optimizer with state (plain SGD has none)")
        if BUG == "activation_missing":
            i = first_hidden_nonlinearity(spec)
            if i is None:
                raise Unsupported("bug activation_missing needs a hidden non-linear activation")
            layers = list(spec.layers)
            layers[i] = dataclasses.replace(layers[i], activation="linear")
            spec = dataclasses.replace(spec, layers=tuple(layers))
        elif BUG == "adam_betas_swapped":  # Adam(betas=(0.999, 0.9))
            spec = dataclasses.replace(spec, optimizer=dataclasses.replace(opt, beta1=opt.beta2, beta2=opt.beta1))
        elif BUG == "lr_typo":  # the spec's decimal with one more zero, in float32 where the spec's lr is one
            single = f32(opt.lr) == opt.lr
            lr = float(Decimal(str(np.float32(opt.lr) if single else opt.lr)) / LR_TYPO)
            spec = dataclasses.replace(spec, optimizer=dataclasses.replace(opt, lr=f32(lr) if single else lr))
        return spec

    def _loss_grads(self, x, y):
        if BUG == "float32_loss":
            ctx = self._ctx(len(x))
            out, caches = numpy_scratch.forward(self.xp, self.spec, self.params, x, keep=True, state=self.state,
                                                training=True, ctx=ctx)
            y32 = y if self.spec.loss.integer_labels else y.astype(np.float32)
            loss, dout = numpy_scratch.loss_and_grad(self.xp, self.spec, out.astype(np.float32), y32)
            grads = numpy_scratch.backward(self.xp, self.spec, self.params, caches, dout.astype(out.dtype), ctx=ctx)
            return loss, grads, ctx.new_state
        if BUG in ("loss_halved", "softmax_axis", "flatten_chw"):
            ctx = self._ctx(len(x))
            out, caches = _forward(self, x, keep=True, training=True, ctx=ctx)
            if BUG == "softmax_axis":
                loss, dout = _softmax_ce_batch_axis(self.xp, self.spec, out, y)
            else:
                loss, dout = numpy_scratch.loss_and_grad(self.xp, self.spec, out, y)
            if BUG == "loss_halved":  # the loss term only (an l2 penalty is added as the spec says)
                half = self.dtype.type(0.5)
                loss, dout = loss * half, dout * half
            grads = _backward(self, caches, dout, ctx)
            return self._add_l2(loss, grads), grads, ctx.new_state
        loss, grads, state = super()._loss_grads(x, y)
        if BUG == "gradient_sign":
            grads[-1] = -grads[-1]
        return loss, grads, state

    def _apply(self, grads):
        if BUG == "bias_frozen":
            grads = [np.zeros_like(g) if p.role == "bias" else g for g, (_, _, p) in zip(grads, self.spec.param_entries())]
        saved_v = [v.copy() for v in self.v] if BUG == "stale_state" and self.t >= 2 else None
        if BUG == "lr_decay":
            opt = self.base_spec.optimizer
            lr = f32(opt.lr * LR_DECAY_RATE ** (self.t / LR_DECAY_STEPS))
            self.spec = dataclasses.replace(self.base_spec, optimizer=dataclasses.replace(opt, lr=lr))
        if BUG == "state_reset":  # a new optimizer: zero moments / momentum, its own step count back to 0 (so a
            # learning-rate schedule, counted by the optimizer as Keras' is, restarts too: no built-in model has one)
            t, self.t = self.t, 0
            for a in (*self.m, *self.v):
                a[...] = 0  # (RMSprop / Adagrad set their initial accumulator at their first update)
            super()._apply(grads)
            self.t = t + 1  # the training step (dropout masks) goes on
        else:
            super()._apply(grads)
        if saved_v is not None:
            for v, old in zip(self.v, saved_v):
                v[...] = old
        if BUG == "weight_decay":
            for p in self.params:
                p -= self.dtype.type(WEIGHT_DECAY) * p

    def train_step(self, x, y):
        if BUG == "batch_shift":
            prev, self.previous = self.previous, (x, y)
            if prev is not None:
                x, y = prev
        return super().train_step(x, y)

    def _ctx(self, batch_size):
        ctx = super()._ctx(batch_size)
        if BUG == "dropout_unscaled":  # 0 or 1 instead of 0 or 1/(1-rate)
            ctx.masks = {i: (m != 0).astype(m.dtype) for i, m in ctx.masks.items()}
        return ctx

    def predict(self, x):
        return self._predict(x, training=BUG == "predict_training_mode")

    def _predict(self, x, training):
        if BUG not in ("softmax_axis", "flatten_chw"):
            return super()._predict(x, training)
        x = self.xp.asarray(np.asarray(x, dtype=self.dtype))
        ctx = self._ctx(len(x)) if training else numpy_scratch._Ctx(self.xp, self.mm)
        out, _ = _forward(self, x, keep=False, training=training, ctx=ctx)
        if BUG == "softmax_axis":
            return self._out(numpy_scratch._softmax(self.xp, out.T).T)
        return self._out(numpy_scratch.predict_from_output(self.xp, self.spec, out))

    def gradients(self, x, y):
        loss, grads = super().gradients(x, y)
        if self.transposed is not None:
            grads[self.transposed] = grads[self.transposed].transpose(self.axes)
        return loss, grads

    def get_weights(self):
        w = super().get_weights()
        if self.transposed is not None:
            w[self.transposed] = w[self.transposed].transpose(self.axes)
        return w
