"""The built-in ``mnist_bn_cnn`` without its dropout: the defaults audit of BatchNorm alone.

In native mode every framework draws its own dropout masks, so a native row of ``mnist_bn_cnn`` can compare only its
inference-mode predictions at the initial weights.  Without the dropout, ``--mode native`` shows what each framework's
BatchNorm defaults (momentum and its convention, epsilon, the stored variance) change in the moving statistics after
K steps and in the inference-mode predictions that depend on them:

    harness compare --model examples/bn_audit.py --mode native --steps 10 --no-timing

A model file may derive its spec from a built-in one, as here.
"""

import dataclasses

from models.spec import Dropout
from models.zoo import MNIST_BN_CNN

SPEC = dataclasses.replace(
    MNIST_BN_CNN,
    name="mnist_bn_cnn_no_dropout",
    description="mnist_bn_cnn without its dropout (conv32-BN-relu-pool, conv64-BN-relu-pool, dense 10): the BatchNorm "
                "defaults audit",
    layers=tuple(layer for layer in MNIST_BN_CNN.layers if not isinstance(layer, Dropout)),
)
