import subprocess
import sys

from harness.runner import PROJECT_ROOT


def test_importing_the_harness_pulls_in_no_framework():
    code = ("import sys, harness.cli, harness.runner, harness.report, harness.agreement, backends, models, models.data;"
            "print(','.join(m for m in ('torch', 'tensorflow', 'jax', 'keras', 'cupy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_registry_names_and_hints():
    import backends

    assert {"numpy", "tf1", "tf2", "keras", "keras-jax", "keras-torch", "torch", "jax", "cupy"} <= set(backends.REGISTRY)
    assert backends.install_hint("torch") == "pip install '.[torch]'"
    try:
        backends.get_info("mxnet")
    except ValueError as e:
        assert "numpy" in str(e) and "mxnet" in str(e)
    else:
        raise AssertionError("unknown backend accepted")
