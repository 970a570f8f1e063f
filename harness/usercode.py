"""Your own implementation as a backend: a Python file loaded from its path.

``harness check my_net.py --model mlp_431`` and ``harness compare --backend-file my_net.py`` run the file in its own
worker subprocess like any backend, named by the file's stem (``my_net``).  It fulfils one of two contracts:

* the full backend contract (``backends/base.py``): the file defines ``class Model`` (``CAPABILITIES``, ``probe`` and
  ``devices`` are optional: both dtypes, aligned and native mode, cpu);
* the minimal contract, for hand-written code: plain module-level functions

  ``init(spec, weights)``: the spec and the initial weights, a list of arrays in ``spec.param_names()`` order and
  canonical layout (Dense kernel ``(in, out)``, bias ``(out,)``, conv HWIO), in the run's dtype;
  ``train_step(x, y) -> loss``: one update on the batch, the loss at the weights before it;
  ``get_weights() -> list of arrays``: the current weights, in the same order and layout;
  optional: ``gradients(x, y) -> (loss, grads)`` (no update), ``predict(x)`` (inference mode, with the spec's
  prediction function), ``get_state()`` (BatchNorm's moving statistics, ``spec.state_names()`` order).
  A model with Dropout: ``train_step(x, y, masks)`` and ``gradients(x, y, masks)`` get the harness's masks (one array
  per Dropout layer, shaped like its input, 0 or ``1 / (1 - rate)``), the same ones every backend multiplies by.

  A missing optional function means fewer checks, and the output says which; the worker never calls it.

The parent (``inspect_file``) only reads the file (``ast``): no user code runs in the harness's own process, so a
syntax error or a missing required function is bad input (exit 2) before any work.  In the worker, an exception in the
user's code or output of the wrong shape becomes an error row whose ``meta["user_error"]`` holds the user's own
traceback lines (frames of the user's file only), the exception and a hint (``error_meta``; ``error_lines`` formats it).
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import inspect
import linecache
import re
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from backends.base import Capabilities, ModelBase, Unsupported

from .runner import UserError

REQUIRED = ("init", "train_step", "get_weights")
OPTIONAL = ("gradients", "predict", "get_state")
# how the harness calls each function (the positional arguments it passes; "masks" only for a model with Dropout)
CALLS = {"init": ("spec", "weights"), "train_step": ("x", "y"), "gradients": ("x", "y"), "predict": ("x",),
         "get_weights": (), "get_state": ()}
NAME_PATTERN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_-]*$")

MINIMAL_EXAMPLE = """\
    def init(spec, weights): ...          # weights: list of arrays, spec.param_names() order, canonical layout
    def train_step(x, y): ...             # one update; return the loss before it
    def get_weights(): ...                # the current weights, same order and layout
    def gradients(x, y): ...              # optional: (loss, grads), no update
    def predict(x): ...                   # optional: the network's output
(see examples/my_backprop.py), or a class Model with the full backend contract (backends/base.py)"""


class ContractError(Exception):
    """The user's code returned something the contract does not allow (wrong number or shape of arrays ...)."""

    def __init__(self, message: str, hint: str, function=None):
        super().__init__(message)
        self.hint = hint
        self.function = function  # the user's function whose output was wrong: its def line is shown


# ------------------------------------------------------------------------------------------ parent: reading the file
@dataclass(frozen=True)
class Function:
    name: str
    line: int
    params: tuple[str, ...]  # positional parameters
    required: int  # positional parameters without a default
    varargs: bool


@dataclass(frozen=True)
class UserFile:
    path: Path  # resolved
    shown: str  # as the user typed it: how messages name the file
    name: str  # the stem: the backend's name in rows
    contract: str  # "full" (class Model) or "minimal" (module functions)
    functions: dict[str, Function] = field(default_factory=dict)  # top-level defs
    names: frozenset[str] = frozenset()  # every name bound at module level
    dynamic: bool = False  # a star import: which names exist is only known when the file runs

    def has(self, name: str) -> bool:
        return self.dynamic or name in self.names

    def check_spec(self, spec) -> None:
        """A Dropout model needs ``masks`` in train_step (and gradients), and only a Dropout model gets them: refused
        before any work otherwise."""
        if self.contract != "minimal":
            return
        for fn in ("train_step", "gradients"):
            f = self.functions.get(fn)
            if f is not None and not spec.random_layers and f.required > 2:
                raise UserError(f"{self.shown}:{f.line}: {fn}{_sig(f)} needs {f.required} arguments, but model "
                                f"{spec.name!r} has no Dropout, so the harness calls {fn}(x, y); hint: give the third "
                                f"a default (masks=None) or leave it out")
            if f is not None and spec.random_layers and not (f.varargs or len(f.params) >= 3):
                raise UserError(f"{self.shown}:{f.line}: {fn}{_sig(f)} takes no dropout masks, but model {spec.name!r} "
                                f"has Dropout (layer {', '.join(map(str, spec.random_layers))}); hint: {MASKS_HINT} "
                                f"def {fn}(x, y, masks)")


MASKS_HINT = ("the harness draws the dropout masks (the same for every backend) and passes them as a third argument, "
              "one array per Dropout layer shaped like that layer's input (0 or 1 / (1 - rate)):")


def _sig(f: Function) -> str:
    return f"({', '.join(f.params)}{', *args' if f.varargs else ''})"


def inspect_file(text: str, builtin_names=()) -> UserFile:
    """Check a user's backend file without running it: UserError (exit 2) for a missing file, not a .py file, a stem
    that is not a usable name or clashes with ``builtin_names``, a syntax error, or a missing required function."""
    path = Path(text).expanduser()
    if not path.exists():
        raise UserError(f"file not found: {text}; give the path of your Python file, e.g. "
                        f"`harness check examples/my_backprop.py --model mlp_431`")
    if path.is_dir():
        raise UserError(f"{text} is a folder; give the path of one Python file, e.g. {Path(text) / 'my_net.py'}")
    if path.suffix != ".py":
        raise UserError(f"{text} is not a .py file; the harness loads your implementation from a Python file "
                        f"(rename it to {path.stem}.py if it is one)")
    name = path.stem
    if not NAME_PATTERN.match(name):
        raise UserError(f"{text}: the file's name {name!r} names its rows, so it may hold only letters, digits, '_' "
                        f"and '-'; rename the file, e.g. to {re.sub(r'[^A-Za-z0-9_-]', '_', name)}.py")
    if name in builtin_names:
        raise UserError(f"{text}: the file's name {name!r} is a built-in backend's name, and rows are named by the "
                        f"file's stem; rename the file, e.g. to my_{name.replace('-', '_')}.py")
    try:
        source = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {text}: {e}") from None
    try:
        tree = ast.parse(source, filename=text)
    except SyntaxError as e:
        raise UserError(syntax_message(e, text)) from None
    names, functions, dynamic = _top_level(tree)
    uf = UserFile(path.resolve(), text, name, contract(lambda n: n in names), functions, frozenset(names), dynamic)
    if uf.contract == "minimal":
        missing = [f for f in REQUIRED if not uf.has(f)]
        if missing:
            found = [f for f in (*REQUIRED, *OPTIONAL) if f in names]
            raise UserError(f"{text} has no {', '.join(m + '()' for m in missing)}"
                            + (f" (it defines {', '.join(f + '()' for f in found)})" if found else "")
                            + f"; the harness needs these module-level functions:\n{MINIMAL_EXAMPLE}")
        for fn, f in functions.items():
            if fn in CALLS:
                _check_arity(uf, f)
    return uf


def contract(has) -> str:
    """"minimal" where the three required functions are there (a file may also import a class named Model to use it),
    else "full" where a Model is, else "minimal" (whose missing functions are then the error)."""
    return "full" if has("Model") and not all(has(f) for f in REQUIRED) else "minimal"


def _check_arity(uf: UserFile, f: Function) -> None:
    given = len(CALLS[f.name])
    fits = f.required <= given and (f.varargs or len(f.params) >= given)
    if f.name in ("train_step", "gradients") and not fits:  # with masks: (x, y, masks)
        fits = f.required <= given + 1 and (f.varargs or len(f.params) >= given + 1)
    if not fits:
        raise UserError(f"{uf.shown}:{f.line}: def {f.name}{_sig(f)} cannot be called as "
                        f"{f.name}({', '.join(CALLS[f.name])}), which is how the harness calls it; hint: "
                        f"def {f.name}({', '.join(CALLS[f.name])})")


def syntax_message(e: SyntaxError, shown: str) -> str:
    where = f"{shown}:{e.lineno}" if e.lineno else shown
    lines = [f"syntax error in {where}: {e.msg}"]
    if e.text:
        text = e.text.rstrip("\n")
        stripped = text.lstrip()
        lines.append(f"    {stripped}")
        if e.offset:
            lines.append("    " + " " * max(0, e.offset - 1 - (len(text) - len(stripped))) + "^")
    lines.append(f"hint: fix that line (python -m py_compile {shown} shows the same error), then run the command "
                 f"again")
    return "\n".join(lines)


def _top_level(tree: ast.Module) -> tuple[set[str], dict[str, Function], bool]:
    """Names bound at module level (also inside top-level if / try / with blocks), the top-level defs, and whether a
    star import makes the set unknowable."""
    names: set[str] = set()
    functions: dict[str, Function] = {}
    dynamic = False

    def visit(body):
        nonlocal dynamic
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                a = node.args
                pos = [p.arg for p in (*a.posonlyargs, *a.args)]
                functions[node.name] = Function(node.name, node.lineno, tuple(pos), len(pos) - len(a.defaults),
                                                a.vararg is not None)
                names.add(node.name)
            elif isinstance(node, ast.ClassDef):
                names.add(node.name)
            elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
                for t in node.targets if isinstance(node, ast.Assign) else [node.target]:
                    names.update(n.id for n in ast.walk(t) if isinstance(n, ast.Name))
            elif isinstance(node, ast.Import):
                names.update((al.asname or al.name).split(".")[0] for al in node.names)
            elif isinstance(node, ast.ImportFrom):
                for al in node.names:
                    if al.name == "*":
                        dynamic = True
                    else:
                        names.add(al.asname or al.name)
            elif isinstance(node, (ast.If, ast.For, ast.While, ast.With, ast.Try)):
                for part in ("body", "orelse", "finalbody"):
                    visit(getattr(node, part, []))
                for h in getattr(node, "handlers", []):
                    visit(h.body)

    visit(tree.body)
    return names, functions, dynamic


def not_checked(spec, has, filename: str) -> dict[str, str]:
    """What a minimal-contract file without an optional function leaves unchecked: {quantity: why}."""
    out = {}
    if not has("gradients"):
        out["gradients"] = f"{filename} has no gradients()"
    if not has("predict"):
        out["predictions"] = f"{filename} has no predict()"
    if spec.state_names() and not has("get_state"):
        out["state"] = f"{filename} has no get_state() for the {' '.join(spec.state_names())} statistics"
    return out


NOT_CHECKED_WHAT = {
    "gradients": "gradients (and their batch-size invariance)",
    "predictions": "predictions (and their batch-size invariance)",
    "state": "BatchNorm moving statistics",
}


def describe_not_checked(items: dict[str, str]) -> list[str]:
    return [f"not checked: {NOT_CHECKED_WHAT.get(k, k)} ({why})" for k, why in items.items()]


# ------------------------------------------------------------------------------------------- worker: loading the file
def file_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]


def import_file(path: str | Path, name: str):
    """Run the user's file as a module (its folder appended to sys.path, so that it can import its neighbours)."""
    path = Path(path)
    folder = str(path.parent)
    if folder not in sys.path:
        sys.path.append(folder)
    module_name = f"dlcompare_user_{name.replace('-', '_')}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses and pickling look their module up here
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(module_name, None)
        raise
    return module


def load_backend(path: str | Path, name: str) -> SimpleNamespace:
    """The user's file as a backend module: ``Model``, ``probe``, ``devices`` (what ``harness.worker`` uses)."""
    path = Path(path)
    module = import_file(path, name)
    version = f"{path.name} sha256:{file_digest(path)}"
    if contract(lambda n: hasattr(module, n)) == "full":
        user_cls = module.Model

        def make(spec, weights, options):
            return CheckedModel(user_cls(spec, weights, options), spec)

        probe = getattr(module, "probe", None)
        return SimpleNamespace(Model=make, CAPABILITIES=getattr(module, "CAPABILITIES", Capabilities()),
                               probe=lambda: f"{probe()}; {version}" if probe else version,
                               devices=getattr(module, "devices", lambda: ["cpu"]), contract="full")
    missing = [f for f in REQUIRED if not callable(getattr(module, f, None))]
    if missing:
        raise ContractError(f"{path.name} has no {', '.join(m + '()' for m in missing)} when it runs",
                            f"the harness needs these module-level functions:\n{MINIMAL_EXAMPLE}")
    return SimpleNamespace(Model=lambda spec, weights, options: MinimalModel(module, path, spec, weights, options),
                           CAPABILITIES=MinimalModel.capabilities, probe=lambda: version,
                           devices=lambda: ["cpu", "cuda"],  # MinimalModel says why a cuda row is skipped
                           contract="minimal")


# --------------------------------------------------------------------------------------- worker: checking the output
def _layout_hint(got: tuple, want: tuple, spec) -> str:
    if len(got) == len(want) == 2 and got == want[::-1] and got != want:
        return (f"that is the transpose: the canonical layout of a Dense kernel is (in, out) = {want}, so that a "
                f"layer computes x @ kernel + bias; if your code keeps W as (out, in) and computes W @ x, return W.T "
                f"(and take weights[j].T in init)")
    if int(np.prod(got)) == int(np.prod(want)):
        return (f"same number of values, another shape: return the array as {want} (a bias is a vector (out,), not "
                f"(1, out): b.reshape({want}))")
    others = [n for n, s in zip(spec.param_names() + spec.state_names(), spec.param_shapes() + spec.state_shapes())
              if tuple(s) == got]
    if others:
        return f"{got} is the shape of {', '.join(others)}: the order is spec.param_names(): {_listing(spec)}"
    return f"expected the canonical layout and order: {_listing(spec)}; is --model the network your file implements?"


def _listing(spec, state: bool = False) -> str:
    names, shapes = ((spec.state_names(), spec.state_shapes()) if state else (spec.param_names(), spec.param_shapes()))
    return ", ".join(f"{n} {tuple(s)}" for n, s in zip(names, shapes))


def check_arrays(arrays, spec, what: str, function=None, state: bool = False) -> list[np.ndarray]:
    """``arrays`` as float64 arrays when they are the spec's parameters (or state) in canonical order and layout;
    ContractError naming the first wrong one otherwise."""
    names = spec.state_names() if state else spec.param_names()
    shapes = [tuple(s) for s in (spec.state_shapes() if state else spec.param_shapes())]
    listing = _listing(spec, state)
    if isinstance(arrays, np.ndarray) or not isinstance(arrays, (list, tuple)):
        raise ContractError(f"{what} returned a {type(arrays).__name__}; expected a list of {len(names)} arrays",
                            f"return a list in spec.{'state' if state else 'param'}_names() order: {listing}",
                            function)
    if len(arrays) != len(names):
        raise ContractError(f"{what} returned {len(arrays)} arrays, expected {len(names)}",
                            f"one array per parameter, in this order and layout: {listing}"
                            + ("; is --model the network your file implements?" if len(arrays) else ""), function)
    out = []
    for j, (a, n, s) in enumerate(zip(arrays, names, shapes)):
        try:
            arr = np.array(a, dtype=np.float64)
        except (TypeError, ValueError, RuntimeError) as e:
            raise ContractError(f"{what}[{j}] ({n}) is a {type(a).__name__} that does not convert to a NumPy array "
                                f"({e})", "return NumPy arrays (torch: t.detach().cpu().numpy(); jax / tf: "
                                          "np.asarray(t))", function) from None
        if arr.shape != s:
            raise ContractError(f"{what}[{j}] ({n}) has shape {arr.shape}, expected {s}",
                                _layout_hint(arr.shape, s, spec), function)
        out.append(arr)
    return out


def check_loss(value, what: str, function=None) -> float:
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ContractError(f"{what} returned a {type(value).__name__} where the loss belongs ({e})",
                            "return the batch's loss as one number, e.g. float(loss)", function) from None
    if arr.size != 1:
        raise ContractError(f"{what} returned {arr.size} values of shape {arr.shape} as the loss, expected one number",
                            "reduce the per-sample losses as the spec's loss says (sse: the sum over the batch and "
                            "the outputs; mean: divided by the batch size)", function)
    return float(arr.reshape(()))


def check_prediction(value, spec, n: int, function=None) -> np.ndarray:
    want = (n, *spec.output_shape)
    try:
        arr = np.array(value, dtype=np.float64)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ContractError(f"predict() returned a {type(value).__name__} that does not convert to a NumPy array ({e})",
                            "return a NumPy array", function) from None
    if arr.shape != want:
        raise ContractError(f"predict() returned shape {arr.shape} for {n} samples, expected {want}",
                            f"one row per sample, shaped like the network's output {tuple(spec.output_shape)}"
                            + (f": out.reshape({want})" if arr.size == int(np.prod(want)) else ""), function)
    return arr


class CheckedModel:
    """A full-contract user Model whose outputs are checked against the spec (wrong shapes: a ContractError with a
    hint, not a silent 'mismatch'); every other attribute is the user's model's own."""

    def __init__(self, inner, spec):
        self._inner, self._spec = inner, spec

    def get_weights(self):
        return check_arrays(self._inner.get_weights(), self._spec, "Model.get_weights()",
                            type(self._inner).get_weights)

    def get_state(self):
        return check_arrays(self._inner.get_state(), self._spec, "Model.get_state()", type(self._inner).get_state,
                            state=True)

    def gradients(self, x, y):
        out = self._inner.gradients(x, y)
        fn = type(self._inner).gradients
        if not (isinstance(out, tuple) and len(out) == 2):
            raise ContractError(f"Model.gradients() returned a {type(out).__name__}, expected (loss, grads)",
                                "return loss, [one gradient per parameter]", fn)
        return check_loss(out[0], "Model.gradients()", fn), check_arrays(out[1], self._spec, "Model.gradients()", fn)

    def predict(self, x):
        return check_prediction(self._inner.predict(x), self._spec, len(x), type(self._inner).predict)

    def __getattr__(self, name):
        return getattr(self._inner, name)


class MinimalModel(ModelBase):
    """The minimal contract as a backend Model: the module's functions, its outputs checked, sensible defaults for
    the rest (``train_steps`` loops ``train_step``; ``sync`` does nothing; ``get_state`` is ``[]`` without a
    ``get_state()``; the dropout masks of the step counted by the updates made since ``init``)."""

    capabilities = Capabilities(modes=("aligned",))

    def __init__(self, module, path: Path, spec, weights, options):
        if options.mode != "aligned":
            raise Unsupported(f"mode {options.mode}: native mode runs each framework with its own defaults; "
                              f"{path.name} is your own code, compared in aligned mode")
        if options.device != "cpu":
            raise Unsupported(f"device {options.device}: the minimal contract runs on the cpu (write a class Model, "
                              f"the full contract, to choose a device)")
        super().__init__(spec, weights, options)  # argument checks
        self.m = module
        self.dtype = np.dtype(options.dtype)
        self.t = 0  # updates since init: the step whose dropout masks apply
        self.not_checked = not_checked(spec, lambda f: callable(getattr(module, f, None)), path.name)
        self._masks = bool(spec.random_layers)
        if self._masks:
            for fn in ("train_step", "gradients"):
                f = getattr(module, fn, None)
                if f is not None and not _takes(f, 3):
                    raise ContractError(f"{fn}() takes no dropout masks, but model {spec.name!r} has Dropout",
                                        f"{MASKS_HINT} def {fn}(x, y, masks)", f)
        self.info = {"optimizer": f"{path.name} (minimal contract)", "contract": "minimal: module functions",
                     "file": f"{path.name} sha256:{file_digest(path)}"}
        if spec.random_layers:
            self.info["dropout_masks"] = "harness"
        self.m.init(spec, [np.array(w, dtype=self.dtype) for w in weights])

    def _args(self, x, y, batch_size):
        return (x, y, self.dropout_masks(self.t, batch_size)) if self._masks else (x, y)

    def train_step(self, x, y) -> float:
        loss = check_loss(self.m.train_step(*self._args(x, y, len(x))), "train_step()", self.m.train_step)
        self.t += 1
        return loss

    def gradients(self, x, y):
        out = self.m.gradients(*self._args(x, y, len(x)))
        if not (isinstance(out, (tuple, list)) and len(out) == 2):
            raise ContractError(f"gradients() returned a {type(out).__name__}"
                                + (f" of {len(out)} items" if isinstance(out, (tuple, list)) else "")
                                + ", expected (loss, grads)", "return loss, [one gradient per parameter, in "
                                                              "spec.param_names() order and canonical layout]",
                                self.m.gradients)
        return (check_loss(out[0], "gradients()", self.m.gradients),
                check_arrays(out[1], self.spec, "gradients()", self.m.gradients))

    def predict(self, x):
        return check_prediction(self.m.predict(x), self.spec, len(x), self.m.predict)

    def get_weights(self):
        return check_arrays(self.m.get_weights(), self.spec, "get_weights()", self.m.get_weights)

    def get_state(self):
        if "state" in self.not_checked or not self.spec.state_names():
            return []
        return check_arrays(self.m.get_state(), self.spec, "get_state()", self.m.get_state, state=True)


def _takes(fn, n: int) -> bool:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return True
    ps = list(sig.parameters.values())
    if any(p.kind == p.VAR_POSITIONAL for p in ps):
        return True
    return len([p for p in ps if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]) >= n


# ------------------------------------------------------------------------------------------ worker: reporting errors
def _same_file(a: str, b: Path) -> bool:
    try:
        return Path(a).resolve() == b
    except OSError:
        return False


def user_frames(tb, path: Path) -> list[dict]:
    """The traceback's frames in the user's file, outermost first: line, function, source."""
    return [{"line": f.lineno, "function": f.name, "source": (f.line or "").strip()}
            for f in traceback.extract_tb(tb) if _same_file(f.filename, path)]


def _def_frame(function, path: Path) -> list[dict]:
    code = getattr(function, "__code__", None)
    if code is None or not _same_file(code.co_filename, path):
        return []
    return [{"line": code.co_firstlineno, "function": code.co_name,
             "source": linecache.getline(code.co_filename, code.co_firstlineno).strip()}]


def _call_hint(function: str | None, spec, batch_size: int | None) -> str:
    if spec is None or function not in CALLS:
        return ""
    b = batch_size or "B"
    x = (b, *spec.input_shape)
    y = (b,) if spec.loss.integer_labels else (b, *spec.output_shape)
    what = {"init": f"weights = [{_listing(spec)}] (canonical layout, spec.param_names() order)",
            "train_step": f"x {x}, y {y}{' (integer labels)' if spec.loss.integer_labels else ''}; one update, "
                          f"returns the loss before it",
            "gradients": f"x {x}, y {y}; returns (loss, grads) without an update",
            "predict": f"x {x}; returns {(b, *spec.output_shape)}", "get_weights": f"returns [{_listing(spec)}]",
            "get_state": f"returns [{_listing(spec, True)}]"}[function]
    args = (*CALLS[function], *(("masks",) if spec.random_layers and function in ("train_step", "gradients") else ()))
    return f"the harness calls {function}({', '.join(args)}): {what}"


def _exception_hint(e: BaseException, function: str | None, spec, batch_size) -> str:
    msg = str(e)
    call = _call_hint(function, spec, batch_size)
    if isinstance(e, ModuleNotFoundError) and function == "<module>":
        return (f"your file imports {e.name!r}, which this environment lacks: install it into the harness's "
                f"environment (.venv/bin/pip install {e.name})")
    if isinstance(e, UnboundLocalError):
        return ("a module-level name assigned inside a function needs `global NAME` at the top of that function (or "
                "update the array in place: W[...] = ...)")
    if isinstance(e, NameError):
        return "a name that is not defined there: a typo, or module-level state that init() should set"
    if isinstance(e, ValueError) and any(w in msg for w in ("broadcast", "matmul", "shapes", "aligned", "dimension")):
        layout = "the weights are in canonical layout, a Dense kernel (in, out): x @ kernel + bias"
        return "a shape mismatch: " + (f"{call}; {layout}" if call else f"rows of x are samples; {layout}")
    if isinstance(e, TypeError) and function in CALLS:
        return call
    if function == "init":
        return f"{call}; is --model the network your file implements?"
    return call or "the exception was raised by your code (the lines above); fix it and run the command again"


def error_meta(e: BaseException, path: str | Path, spec=None, batch_size: int | None = None) -> dict:
    """An error row's status, reason and ``user_error`` for an exception raised while running the user's file:
    only the user's own frames (file:line and the source line), the exception and a hint."""
    from .status import Status

    path = Path(path).resolve()
    if isinstance(e, SyntaxError) and e.filename and _same_file(e.filename, path):  # a file changed since the check
        frames = [{"line": e.lineno, "function": "<module>", "source": (e.text or "").strip()}]
    else:
        frames = user_frames(e.__traceback__, path)
    if isinstance(e, ContractError):  # raised by the harness on the user's output: point at the function's def
        frames = _def_frame(e.function, path)
        exception, hint = str(e), e.hint
        function = getattr(e.function, "__name__", None)
    else:
        first = (str(e).strip().splitlines() or [""])[0]
        exception = f"{type(e).__name__}: {first}" if first else type(e).__name__
        function = frames[0]["function"] if frames else None
        hint = _exception_hint(e, function, spec, batch_size)
    if not frames and not isinstance(e, ContractError):  # not raised in the user's file: keep the whole traceback
        return {"status": Status.ERROR, "reason": exception, "traceback": "".join(traceback.format_exception(e))}
    last = frames[-1] if frames else None
    where = f" ({path.name}:{last['line']} in {last['function']})" if last else ""
    return {"status": Status.ERROR, "reason": exception + where,
            "user_error": {"file": path.name, "exception": exception, "frames": frames, "hint": hint}}


def error_lines(user_error: dict, shown: str) -> list[str]:
    """Console lines for a row's ``meta["user_error"]``: the user's frames as file:line with the source line, the
    exception, the hint."""
    out = []
    for f in user_error.get("frames", []):
        out.append(f"  {shown}:{f['line']} in {f['function']}")
        if f.get("source"):
            out.append(f"      {f['source']}")
    out.append(f"  {user_error['exception']}")
    if user_error.get("hint"):
        out.append(f"  hint: {user_error['hint']}")
    return out
