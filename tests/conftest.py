import os
import sys

import pytest

# Keep the suite off the user's real data caches: tests see only what is in the repo (and tmp_path).
os.environ.pop("DLCOMPARE_DATA_DIR", None)


@pytest.fixture
def results_dir(tmp_path):
    d = tmp_path / "results"
    d.mkdir()
    return d


@pytest.fixture
def keras_tf():
    """Keras on TensorFlow in this process; restores the global float type that a float64 Model sets."""
    pytest.importorskip("tensorflow")
    if "keras" not in sys.modules and os.environ.get("KERAS_BACKEND", "tensorflow") != "tensorflow":
        pytest.skip("KERAS_BACKEND is not tensorflow in this process")
    keras = pytest.importorskip("keras")
    if keras.backend.backend() != "tensorflow":
        pytest.skip(f"Keras runs on {keras.backend.backend()} in this process")
    floatx, policy = keras.config.floatx(), keras.config.dtype_policy()
    yield keras
    keras.config.set_floatx(floatx)
    keras.config.set_dtype_policy(policy)
