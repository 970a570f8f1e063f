"""Planted-bug copies of the NumPy backend for ``harness selftest`` (a backend module: same contract).

``DLCOMPARE_MUTANT=<bug>`` picks the bug; ``none`` is the clean copy.  Each bug is one a real port makes.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from backends import numpy_scratch
from backends.base import Unsupported
from backends.numpy_scratch import CAPABILITIES, devices, probe  # noqa: F401  (the backend contract)
from models.spec import Adam, Loss, f32

WEIGHT_DECAY = 1e-4  # the AdamW paper's decoupled form at schedule multiplier 1: w -= lambda * w
LR_DECAY_RATE, LR_DECAY_STEPS = 0.9, 10

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
}
NEEDS = {  # bug -> (what the model must have, the test): n/a on models without it
    "bn_momentum_convention": ("a BatchNorm layer", lambda spec: bool(spec.couples_batch)),
    "predict_training_mode": ("a BatchNorm or Dropout layer", lambda spec: bool(spec.couples_batch or spec.random_layers)),
    "dropout_unscaled": ("a Dropout layer", lambda spec: bool(spec.random_layers)),
}

# (bug, batch size) where the bug computes the very same numbers as the spec: not a miss when it passes
IDENTICAL_AT = {("reduction", 1): "the sum and the mean of one sample are the same number"}

BUG = os.environ.get("DLCOMPARE_MUTANT", "none")


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
        super().__init__(spec, weights, options)
        self.base_spec = spec
        self.transposed = None
        if BUG == "transposed_weight":
            square = [j for j, (_, _, p) in enumerate(spec.param_entries())
                      if p.role == "kernel" and len(p.shape) == 2 and p.shape[0] == p.shape[1]]
            if not square:
                raise Unsupported("bug transposed_weight needs a square dense kernel (mnist_mlp has one)")
            self.transposed = square[0]
            self.params[self.transposed] = self.params[self.transposed].T.copy()
        self.previous = None

    def _loss_grads(self, x, y):
        if BUG == "float32_loss":
            ctx = self._ctx(len(x))
            out, caches = numpy_scratch.forward(self.xp, self.spec, self.params, x, keep=True, state=self.state,
                                                training=True, ctx=ctx)
            y32 = y if self.spec.loss.integer_labels else y.astype(np.float32)
            loss, dout = numpy_scratch.loss_and_grad(self.xp, self.spec, out.astype(np.float32), y32)
            grads = numpy_scratch.backward(self.xp, self.spec, self.params, caches, dout.astype(out.dtype), ctx=ctx)
            return loss, grads, ctx.new_state
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

    def gradients(self, x, y):
        loss, grads = super().gradients(x, y)
        if self.transposed is not None:
            grads[self.transposed] = grads[self.transposed].T
        return loss, grads

    def get_weights(self):
        w = super().get_weights()
        if self.transposed is not None:
            w[self.transposed] = w[self.transposed].T
        return w
