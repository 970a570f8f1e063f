"""Framework-free model specs, the model zoo and the data sets.  Imports nothing heavier than NumPy."""

from .spec import SGD, Adam, Conv2D, Dense, Flatten, Init, Loss, MaxPool2D, ModelSpec, f32, init_weights
from .zoo import MODELS, get_model

__all__ = ["SGD", "Adam", "Conv2D", "Dense", "Flatten", "Init", "Loss", "MaxPool2D", "ModelSpec", "f32",
           "init_weights", "MODELS", "get_model"]
