"""Backend registry: name -> module path, imported on demand (never at ``import backends``).

Finding out whether a backend is installed uses ``importlib.util.find_spec`` and package metadata only, so listing
backends never imports a heavy framework.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
from dataclasses import dataclass, field


@dataclass(frozen=True)
class BackendInfo:
    name: str
    module: str  # imported inside the backend's own subprocess only
    requires: tuple[str, ...]  # importable top-level modules it needs
    extra: str | None  # pip install ".[extra]"
    description: str
    env: dict[str, str] = field(default_factory=dict)  # set in the backend's subprocess before anything is imported
    distributions: tuple[str, ...] = ()  # package names whose version is shown (first one installed wins)
    hint: str | None = None  # install command when there is no extra for it
    path: str | None = None  # a user's own file (harness check / compare --backend-file), loaded from this path


REGISTRY: dict[str, BackendInfo] = {
    b.name: b
    for b in (
        BackendInfo("numpy", "backends.numpy_scratch", ("numpy",), None,
                    "hand-written forward/backward in NumPy (the float64 oracle)", distributions=("numpy",)),
        BackendInfo("tf1", "backends.tf1_graph", ("tensorflow",), "tf",
                    "TF1 graph mode: tf.compat.v1 Session, placeholders, tf.compat.v1.train optimizers",
                    distributions=("tensorflow-cpu", "tensorflow")),
        BackendInfo("tf2", "backends.tf2_tape", ("tensorflow",), "tf",
                    "TF2 eager GradientTape, step under tf.function", distributions=("tensorflow-cpu", "tensorflow")),
        BackendInfo("keras", "backends.keras_api", ("keras", "tensorflow"), "tf",
                    "Keras 3 high level (train_on_batch / fit) on its TensorFlow backend",
                    env={"KERAS_BACKEND": "tensorflow"}, distributions=("keras",)),
        BackendInfo("keras-jax", "backends.keras_api", ("keras", "jax"), "all",
                    "the same Keras code with KERAS_BACKEND=jax", env={"KERAS_BACKEND": "jax"},
                    distributions=("keras",)),
        BackendInfo("keras-torch", "backends.keras_api", ("keras", "torch"), "all",
                    "the same Keras code with KERAS_BACKEND=torch", env={"KERAS_BACKEND": "torch"},
                    distributions=("keras",)),
        BackendInfo("torch", "backends.torch_eager", ("torch",), "torch", "PyTorch nn.Module, eager",
                    distributions=("torch",)),
        BackendInfo("jax", "backends.jax_jit", ("jax",), "jax", "pure JAX functions, train step under jax.jit",
                    distributions=("jax",)),
        BackendInfo("cupy", "backends.numpy_scratch", ("cupy",), None,
                    "the hand-written NumPy backend run on the GPU through CuPy",
                    env={"DLCOMPARE_ARRAY_MODULE": "cupy"},
                    distributions=("cupy", "cupy-cuda12x", "cupy-cuda13x", "cupy-cuda11x"),
                    hint="pip install cupy-cuda12x (needs an NVIDIA GPU)"),
    )
}


PLUGINS_ENV = "DLCOMPARE_PLUGINS"


def plugins() -> dict[str, BackendInfo]:
    """Extra backends from ``$DLCOMPARE_PLUGINS``: ``name=module[:KEY=VALUE...]`` entries separated by commas.

    Lets a user compare their own implementation (any module with the backend contract, importable from PYTHONPATH),
    and lets the self-test and the robustness tests run planted-bug and fault-injecting backends in real subprocesses.
    """
    out = {}
    for entry in filter(None, (e.strip() for e in os.environ.get(PLUGINS_ENV, "").split(","))):
        name, sep, rest = entry.partition("=")
        if not sep or not rest:
            raise ValueError(f"{PLUGINS_ENV} entry {entry!r} is not name=module[:KEY=VALUE...]")
        module, *pairs = rest.split(":")
        env = dict(p.split("=", 1) for p in pairs if "=" in p)
        out[name] = BackendInfo(name, module, (), None, f"plugin {module}", env=env)
    return out


# A user's own implementation, loaded from its path (harness.usercode): registered in the parent by
# ``register_file``; its worker subprocess finds it again through FILE_ENV, which the parent sets there (internal: a
# user never sets it).
FILE_ENV = "DLCOMPARE_BACKEND_FILE"
_FILES: dict[str, BackendInfo] = {}


def _file_info(name: str, path: str) -> BackendInfo:
    return BackendInfo(name, "harness.usercode", (), None, f"your own file {os.path.basename(path)}",
                       env={FILE_ENV: f"{name}={path}"}, hint=f"install what {os.path.basename(path)} imports",
                       path=path)


def register_file(name: str, path: str) -> BackendInfo:
    """Register the user's file ``path`` as backend ``name`` (its stem) in this process; a name of a built-in backend
    or a plugin is refused (rows are named by it)."""
    if name in REGISTRY or name in plugins():
        raise ValueError(f"backend name {name!r} (from {os.path.basename(path)}) is taken by a built-in backend or a "
                         f"plugin; rename the file")
    _FILES[name] = _file_info(name, str(path))
    return _FILES[name]


def registered_files() -> dict[str, BackendInfo]:
    """The user's files registered in this process (``register_file``)."""
    return dict(_FILES)


def file_backends() -> dict[str, BackendInfo]:
    out = dict(_FILES)
    name, sep, path = os.environ.get(FILE_ENV, "").partition("=")
    if sep and name not in out:
        out[name] = _file_info(name, path)
    return out


def all_backends() -> dict[str, BackendInfo]:
    return {**REGISTRY, **plugins(), **file_backends()}


def get_info(name: str) -> BackendInfo:
    found = all_backends().get(name)
    if found is None:
        raise ValueError(f"unknown backend {name!r}; valid backends: {', '.join(REGISTRY)}")
    return found


def missing_requirements(name: str) -> list[str]:
    """The required modules of backend ``name`` that cannot be found (without importing anything)."""
    return [m for m in get_info(name).requires if importlib.util.find_spec(m) is None]


def install_hint(name: str) -> str:
    info = get_info(name)
    if info.hint:
        return info.hint
    if info.extra:
        return f"pip install '.[{info.extra}]'"
    return f"pip install {' '.join(info.requires)}"


def version(name: str) -> str | None:
    """Installed version of the backend's main package, from metadata (no import)."""
    for dist in get_info(name).distributions:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def load(name: str):
    """Import and return the backend module (call inside the backend's own subprocess); a user's file is run from its
    path and adapted to the backend contract (``harness.usercode.load_backend``)."""
    info = get_info(name)
    if info.path:
        from harness.usercode import load_backend

        return load_backend(info.path, name)
    return importlib.import_module(info.module)
