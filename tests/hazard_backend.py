"""A NumPy backend with one "framework default" of its own, for tests/test_hazards.py: in native mode with the key
``leaky_relu_slope`` active it uses slope 0.01 (torch's and jax.nn's default) instead of the spec's, and says so the
way every backend does (``info["native_settings"]``).  Registered through ``DLCOMPARE_PLUGINS``."""

from dataclasses import replace

from backends import numpy_scratch
from backends.numpy_scratch import CAPABILITIES, devices, probe  # noqa: F401  (the backend contract)
from models.spec import Activation, f32


class Model(numpy_scratch.Model):
    def __init__(self, spec, weights, options):
        super().__init__(spec, weights, options)  # validates native_only
        if self.native("leaky_relu_slope") and any(getattr(la, "activation", "") == "leaky_relu" for la in spec.layers):
            layers = tuple(replace(la, negative_slope=f32(0.01)) if isinstance(la, Activation) else la for la in spec.layers)
            self.spec = replace(spec, layers=layers)
            self.info["native_settings"] = {"leaky_relu_slope": "F.leaky_relu(negative_slope=0.01)"}
            self.info["native_differences"] = ["leaky_relu slope 0.01 (spec 0.2)"]
