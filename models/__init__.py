"""Framework-free model specs, the model zoo and the data sets.  Imports nothing heavier than NumPy."""

from .spec import (
                   SGD,
                   Activation,
                   Adam,
                   BatchNorm,
                   Conv2D,
                   Dense,
                   Dropout,
                   Flatten,
                   Init,
                   Layer,
                   Loss,
                   MaxPool2D,
                   ModelSpec,
                   ParamSpec,
                   dropout_masks,
                   f32,
                   init_state,
                   init_weights,
                   spec_from_dict,
                   spec_to_dict,
)
from .zoo import MODELS, get_model

__all__ = ["SGD", "Activation", "Adam", "BatchNorm", "Conv2D", "Dense", "Dropout", "Flatten", "Init", "Layer", "Loss",
           "MaxPool2D", "ModelSpec", "ParamSpec", "dropout_masks", "f32", "init_state", "init_weights", "spec_from_dict",
           "spec_to_dict", "MODELS", "get_model"]
