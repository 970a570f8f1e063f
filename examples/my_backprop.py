"""A 4-3-1 sigmoid network written by hand in NumPy: forward, backward by the chain rule, plain gradient descent.

This is the network of the "neural network from scratch" tutorials (4 inputs, 3 sigmoid hidden units, 1 sigmoid
output, trained on X = [[1,0,1,0], [1,0,1,1], [0,1,0,1]], y = [1, 1, 0]), written as the harness's minimal contract:
five module-level functions.  Check it against the NumPy float64 oracle with

    harness check examples/my_backprop.py --model mlp_431

The harness calls init() with the model spec and the initial weights, then train_step() on each batch, and compares
the losses, gradients(), get_weights() and predict() with the oracle's at every checked step.  Plant a mistake (say,
drop the 2 in d_out) and run the same command again to see what a failing check looks like.
"""

import numpy as np

W1 = b1 = W2 = b2 = None  # the weights: set by init(), updated by train_step()
lr = None  # the learning rate, from the spec


def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def init(spec, weights):
    """The spec (models/zoo.py: mlp_431) and the initial weights, in spec.param_names() order and canonical layout:
    dense0/kernel (4, 3), dense0/bias (3,), dense1/kernel (3, 1), dense1/bias (1,)."""
    global W1, b1, W2, b2, lr
    n_in, n_hidden, n_out = spec.input_shape[0], spec.layers[0].units, spec.layers[1].units
    W1, b1, W2, b2 = (np.array(w) for w in weights)  # copies, in the run's dtype (float64 unless --dtype float32)
    if W1.shape != (n_in, n_hidden) or W2.shape != (n_hidden, n_out):  # a kernel is (in, out): x @ W
        raise ValueError(f"kernels of shapes {W1.shape}, {W2.shape}; expected {(n_in, n_hidden)}, {(n_hidden, n_out)}")
    lr = spec.optimizer.lr  # SGD(lr=0.1)


def forward(x):
    h = sigmoid(x @ W1 + b1)  # (N, 3): the hidden layer
    out = sigmoid(h @ W2 + b2)  # (N, 1): the output
    return h, out


def gradients(x, y):
    """The loss and d loss / d each weight at the current weights, by the chain rule, layer by layer backwards."""
    h, out = forward(x)
    loss = np.sum((out - y) ** 2)  # the spec's "sse": sum over the batch of (out - y)^2, no 1/2
    d_out = 2 * (out - y)  # d loss / d out (no 1/2 in the loss, so the 2 stays)
    d_z2 = d_out * out * (1 - out)  # through the output sigmoid: sigmoid'(z) = s (1 - s)
    dW2 = h.T @ d_z2  # (3, 1)
    db2 = d_z2.sum(axis=0)  # (1,): the bias gets every sample's share
    d_h = d_z2 @ W2.T  # (N, 3): back into the hidden layer
    d_z1 = d_h * h * (1 - h)  # through the hidden sigmoid
    dW1 = x.T @ d_z1  # (4, 3)
    db1 = d_z1.sum(axis=0)  # (3,)
    return loss, [dW1, db1, dW2, db2]


def train_step(x, y):
    """One step of gradient descent on the batch; returns the loss before the update."""
    global W1, b1, W2, b2
    loss, (dW1, db1, dW2, db2) = gradients(x, y)
    W1, b1, W2, b2 = W1 - lr * dW1, b1 - lr * db1, W2 - lr * dW2, b2 - lr * db2
    return loss


def predict(x):
    return forward(x)[1]


def get_weights():
    return [W1, b1, W2, b2]
