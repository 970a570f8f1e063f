"""Plain PyTorch training loop (``nn.Sequential``, ``torch.optim.Adam``, eager) of the MNIST MLP or CNN, timed like
the harness.

    python benchmarks/plain/torch_loop.py --model mnist_cnn --batch-size 100 [--device cuda]

What the PyTorch tutorials write: ``zero_grad`` / ``cross_entropy(model(x), y)`` / ``backward`` / ``step``, in NCHW
with torch's default initialisation.  ``torch.optim.Adam`` adds eps to ``sqrt(v_hat)``; the eps-hat convention of
the spec is had by setting ``eps = eps / sqrt(1 - b2^t)`` in the param group before each step (the numerics guide's
recipe; ``--adam manual`` writes the update with torch ops instead, as the harness's backend does).  The batches are
tensors on the device made before timing (``--feed numpy``: ``torch.from_numpy`` + NHWC->NCHW in the step); the
losses stay on the device until the end of the round.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from _protocol import BETA1, BETA2, EPS, LR, adam_alpha, parse_args, run
from torch import nn


def build(model):
    if model == "mnist_mlp":
        return nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    return nn.Sequential(nn.Conv2d(1, 32, 3), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(1600, 128), nn.ReLU(), nn.Linear(128, 10))


def load_canonical(model, weights, dtype):
    """Canonical weights (dense (in, out), conv HWIO, flatten in (h, w, c) order) into torch's layout, in place."""
    params = list(model.parameters())
    with torch.no_grad():
        for p, w in zip(params, weights, strict=True):
            if w.ndim == 4:
                w = w.transpose(3, 2, 0, 1)  # HWIO -> OIHW
            elif w.ndim == 2:
                if w.shape[0] == 1600:  # the dense layer after the flatten: rows (h, w, c) -> torch's (c, h, w)
                    w = w[np.arange(1600).reshape(5, 5, 64).transpose(2, 0, 1).ravel()]
                w = w.T  # (in, out) -> (out, in)
            p.copy_(torch.from_numpy(np.ascontiguousarray(w)).to(dtype))


def to_tensor(x, device):
    t = torch.from_numpy(x)
    if t.dim() == 4:
        t = t.permute(0, 3, 1, 2)  # NHWC -> NCHW
    return t.contiguous().to(device)


def extra_args(p) -> None:
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--adam", choices=("optim", "manual"), default="optim",
                   help="optim: torch.optim.Adam with eps-hat via eps set per step (default); manual: by hand")


def setup(args, xs, ys, weights):
    device_name = getattr(args, "device", "cpu")
    adam = getattr(args, "adam", "optim")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(device_name)
    dtype = {"float32": torch.float32, "float64": torch.float64}[args.dtype]
    model = build(args.model).to(device=device, dtype=dtype)
    if weights is not None:
        load_canonical(model, weights, dtype)
    params = list(model.parameters())
    eps = EPS[args.model]
    opt = torch.optim.Adam(params, lr=LR, betas=(BETA1, BETA2), eps=eps)
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    t = 0

    def train_step(x, y):
        nonlocal t
        t += 1
        if adam == "optim":
            for group in opt.param_groups:
                group["eps"] = eps / math.sqrt(1.0 - BETA2**t)
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            return loss.detach()
        loss = F.cross_entropy(model(x), y)
        grads = torch.autograd.grad(loss, params)
        alpha = adam_alpha(t)
        with torch.no_grad():
            for p, mi, vi, g in zip(params, m, v, grads):
                mi.add_((g - mi).mul_(1 - BETA1))
                vi.add_((g * g - vi).mul_(1 - BETA2))
                p.sub_((mi * alpha).div_(vi.sqrt().add_(eps)))
        return loss.detach()

    if args.feed == "tensor":
        batches = [(to_tensor(xs[k], device), torch.from_numpy(ys[k]).to(device)) for k in range(len(xs))]

        def run_round():
            return torch.stack([train_step(x, y) for x, y in batches]).cpu().numpy()
    else:
        def run_round():
            losses = [train_step(to_tensor(xs[k], device), torch.from_numpy(ys[k]).to(device)) for k in range(len(xs))]
            return torch.stack(losses).cpu().numpy()

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    return run_round, sync, lambda: {"version": torch.__version__, "torch_threads": torch.get_num_threads(),
                                     "adam": adam, "device": device_name}


def main() -> None:
    run("torch", parse_args("torch", extra=extra_args), setup)


if __name__ == "__main__":
    main()
