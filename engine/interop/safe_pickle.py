"""Read a foreign torch checkpoint (fairseq's ``.pt``) without running any code pickled in it.

A pickle names the functions it calls to rebuild its objects; ``pickle.load`` imports and calls
whatever it names, so a checkpoint can run any command. ``SafeUnpickler`` resolves names against an
allow-list instead, and ``load_checkpoint_safely`` hands it to ``torch.load`` (which still rebuilds
the tensors and storages of its own zip and legacy formats):

- tensors: torch's tensor and parameter rebuild functions, ``torch.Size``, dtypes, devices, and
  numpy scalars and arrays (fairseq's meters keep numpy values);
- plain data: ``dict``, ``list``, ``tuple``, ``set``, numbers, strings, bytes (protocol 2 writes them
  as ``_codecs.encode(text, "latin1")``), ``collections.OrderedDict`` and ``collections.defaultdict``
  (of a plain type);
- configuration objects, rebuilt as plain data by stand-ins that never import the original classes:
  OmegaConf's ``DictConfig`` / ``ListConfig`` and value nodes (pickled as ``_content`` / ``_val``
  with ``_metadata`` and ``_parent``), its metadata, ``typing`` annotations, ``argparse.Namespace``,
  ``pathlib`` paths, and the enum members and dataclass types of fairseq's own modules
  (``fairseq.*``, ``examples.*``), which become strings.

Anything else is refused with ``UnsafePickleError`` naming the class, before it is called.
``plain(obj)`` turns the stand-ins into dicts, lists and scalars, resolving OmegaConf
``${a.b}`` interpolations against the root config.
"""

from __future__ import annotations

import builtins
import pickle
import re
import types
import zipfile
from collections import OrderedDict
from pathlib import Path

import torch

from ..training.safe_load import UnsafePickleError

__all__ = ["UnsafePickleError", "SafeUnpickler", "load_checkpoint_safely", "plain"]


# Callables torch's own formats need to rebuild tensors (storages are resolved by torch.load itself).
_TORCH = {
    ("torch._utils", "_rebuild_tensor"), ("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_tensor_v3"),
    ("torch._utils", "_rebuild_parameter"), ("torch._utils", "_rebuild_parameter_with_state"),
    ("torch", "Size"), ("torch", "device"),
}  # fmt: skip
_BUILTINS = {"dict", "list", "tuple", "set", "frozenset", "int", "float", "complex", "str", "bytes", "bytearray",
             "bool", "slice", "NoneType"}  # fmt: skip
# Python 2 names protocol 2 pickles use for builtins.
_PY2_NAMES = {"unicode": "str", "long": "int", "basestring": "str", "xrange": "range"}
_NUMPY = {"scalar", "_reconstruct", "dtype", "ndarray"}
_FOREIGN_MODULES = ("fairseq.", "fairseq_cli.", "examples.")
# fairseq's enums whose members pickle as their integer values (``enum.auto()``); ChoiceEnum / StrEnum
# members pickle as their own name.
_ENUM_NAMES = {
    "Modality": {1: "AUDIO", 2: "IMAGE", 3: "TEXT"},
    "PredictionMode": {1: "MEAN_POOLING", 2: "CLS_TOKEN", 3: "LIN_SOFTMAX"},
}


class _Container:
    """An OmegaConf DictConfig / ListConfig rebuilt as data: ``_content`` holds the nodes."""

    def __new__(cls, *args):
        return object.__new__(cls)

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) == 2:  # (dict state, slot state)
            state = {**(state[0] or {}), **(state[1] or {})}
        self.state = state if isinstance(state, dict) else {}


class _Node(_Container):
    """An OmegaConf value node: ``_val`` holds the value."""


class _Metadata(_Container):
    """OmegaConf metadata: kept only so that the pickle's references resolve; dropped by ``plain``."""


class _Namespace(_Container):
    """An ``argparse.Namespace``: its attributes become a dict."""


class _TypeRef(str):
    """A type annotation or a fairseq class named in a config's metadata: only its name is kept."""


def _foreign_member(module: str, name: str):
    """A fairseq class reference: callable only as an enum member ``Class(value)``, which gives a string."""

    def member(*args):
        if len(args) != 1 or not isinstance(args[0], (str, int)) or isinstance(args[0], bool):
            raise UnsafePickleError(f"the checkpoint would build {module}.{name}{args!r}, which is not allowed")
        value = args[0]
        return value if isinstance(value, str) else _ENUM_NAMES.get(name, {}).get(value, f"{name}.{value}")

    member.__qualname__ = member.__name__ = name
    return member


def _defaultdict(factory=None, *args):
    if factory not in (None, dict, list, set, int, float, str) or args:
        raise UnsafePickleError("the checkpoint would build a collections.defaultdict of a non-plain type")
    return {}


def _latin1_bytes(text, encoding="latin1") -> bytes:
    """Protocol 2 pickles ``bytes`` (numpy's scalar payloads) as ``_codecs.encode(text, "latin1")``."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafePickleError("the checkpoint calls _codecs.encode with other than (str, 'latin1')")
    return text.encode("latin1")


def _path(*parts) -> str:
    """A pickled ``pathlib`` path (OmegaConf's PathNode) as its string."""
    if not all(isinstance(part, str) for part in parts):
        raise UnsafePickleError("the checkpoint would build a pathlib path from non-strings")
    return "/".join(parts)


_OMEGACONF = {
    "omegaconf.dictconfig": {"DictConfig": _Container},
    "omegaconf.listconfig": {"ListConfig": _Container},
    "omegaconf.base": {"ContainerMetadata": _Metadata, "Metadata": _Metadata},
}


class SafeUnpickler(pickle.Unpickler):
    """A ``pickle.Unpickler`` that resolves only allow-listed names (see the module docstring)."""

    def find_class(self, module: str, name: str):
        module = {"__builtin__": "builtins", "copy_reg": "copyreg"}.get(module, module)
        if module == "builtins":
            name = _PY2_NAMES.get(name, name)
            if name in _BUILTINS:
                return type(None) if name == "NoneType" else getattr(builtins, name)
        elif (module, name) in _TORCH:
            return getattr(__import__(module, fromlist=[name]), name)
        elif module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        elif module == "collections" and name == "OrderedDict":
            return OrderedDict
        elif module == "collections" and name == "defaultdict":
            return _defaultdict
        elif module in ("numpy", "numpy.core.multiarray", "numpy._core.multiarray") and name in _NUMPY:
            import numpy

            if name in ("dtype", "ndarray"):
                return getattr(numpy, name)
            core = getattr(numpy, "_core", None) or numpy.core  # numpy 2 renamed numpy.core
            return getattr(core.multiarray, name)
        elif module.startswith("numpy.dtypes") and name.endswith("DType"):
            import numpy

            return getattr(numpy.dtypes, name)
        elif module in _OMEGACONF and name in _OMEGACONF[module]:
            return _OMEGACONF[module][name]
        elif module == "omegaconf.nodes" and name.endswith("Node"):
            return _Node
        elif module == "typing":
            return _TypeRef(f"typing.{name}")
        elif module == "_codecs" and name == "encode":
            return _latin1_bytes
        elif module == "pathlib" and name in ("Path", "PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"):
            return _path
        elif module == "argparse" and name == "Namespace":
            return _Namespace
        elif module.startswith(_FOREIGN_MODULES) or module in ("fairseq", "examples"):
            return _foreign_member(module, name)
        raise UnsafePickleError(f"the checkpoint names {module}.{name}, which is not allowed (it could run code)")


def _safe_module() -> types.ModuleType:
    """A module-like object for ``torch.load(pickle_module=...)``: its ``Unpickler`` and ``load``."""
    module = types.ModuleType("d2v2_safe_pickle")
    module.Unpickler = SafeUnpickler
    module.load = lambda file, **kwargs: SafeUnpickler(file, **kwargs).load()
    module.__version__ = "1"
    return module


def load_checkpoint_safely(path: str | Path) -> object:
    """``torch.load`` of ``path`` on the CPU through ``SafeUnpickler``: UnsafePickleError for a
    forbidden class, ValueError for a file that is not a readable torch checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}")
    try:
        # Zip-format files are memory-mapped: a checkpoint's optimizer state need not fit in memory.
        mmap = zipfile.is_zipfile(path)
        return torch.load(path, map_location="cpu", pickle_module=_safe_module(), weights_only=False, mmap=mmap)
    except UnsafePickleError as e:
        raise UnsafePickleError(f"refusing {path}: {e}") from None
    except Exception as e:  # noqa: BLE001 - a damaged or foreign file fails in many ways
        message = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ValueError(f"cannot read {path} as a torch checkpoint ({type(e).__name__}: {message})") from e


# -- stand-ins -> plain data ------------------------------------------------------------------------

_INTERPOLATION = re.compile(r"^\$\{([A-Za-z0-9_.]+)\}$")
MAX_DEPTH = 100
"""How deep a config may nest (fairseq's nest about 5 levels); deeper is refused before Python's stack runs out."""


class ConfigShapeError(ValueError):
    """A pickled config nests too deep or contains itself: not a config fairseq writes."""


def plain(obj):
    """The stand-ins of a loaded config as dicts, lists and scalars; ``${a.b}`` interpolations that
    name a key of the root are resolved, others are left as strings.

    A pickle can share one object many times (a list holding the same list twice, 40 levels deep, is
    2**40 paths): each object is converted once and its result shared, so the work follows the file's
    size. A config that contains itself or nests more than ``MAX_DEPTH`` levels is a ConfigShapeError.
    """
    root = _strip(obj, {}, 0)
    return _resolve(root, root, 0, {}, 0)


_VISITING = object()


def _strip(obj, memo: dict, level: int):
    if not isinstance(obj, (_Container, dict, list, tuple)):
        return str(obj) if isinstance(obj, _TypeRef) else obj
    if level > MAX_DEPTH:
        raise ConfigShapeError(f"the checkpoint's config nests more than {MAX_DEPTH} levels deep")
    seen = memo.get(id(obj))
    if seen is not None:
        if seen[1] is _VISITING:
            raise ConfigShapeError("the checkpoint's config contains itself (a cycle)")
        return seen[1]
    memo[id(obj)] = (obj, _VISITING)  # ``obj`` kept alive, so that its id is not reused
    level += 1
    if isinstance(obj, _Node):
        result = _strip(obj.state.get("_val"), memo, level)
    elif isinstance(obj, _Namespace):
        result = {k: _strip(v, memo, level) for k, v in obj.state.items()}
    elif isinstance(obj, _Metadata):
        result = None
    elif isinstance(obj, _Container):
        content = obj.state.get("_content")
        if isinstance(content, dict):
            result = {(str(k) if isinstance(k, _TypeRef) else k): _strip(v, memo, level) for k, v in content.items()}
        elif isinstance(content, (list, tuple)):
            result = [_strip(v, memo, level) for v in content]
        else:
            result = content  # None, "???" (missing) or an interpolation of the whole container
    elif isinstance(obj, dict):
        result = {k: _strip(v, memo, level) for k, v in obj.items()}
    elif isinstance(obj, tuple):
        result = tuple(_strip(v, memo, level) for v in obj)
    else:
        result = [_strip(v, memo, level) for v in obj]
    memo[id(obj)] = (obj, result)
    return result


def _resolve(obj, root, depth: int, memo: dict, level: int):
    """``obj`` with interpolations resolved; ``depth`` counts the interpolations followed to reach it
    (at most 10), ``level`` the nesting (at most ``MAX_DEPTH``); shared objects are resolved once."""
    if isinstance(obj, str) and depth < 10:
        match = _INTERPOLATION.match(obj)
        if match:
            node = root
            for key in match.group(1).split("."):
                if not isinstance(node, dict) or key not in node:
                    return obj
                node = node[key]
            return _resolve(node, root, depth + 1, memo, level + 1)
    if not isinstance(obj, (dict, list)):
        return obj
    if level > MAX_DEPTH:
        raise ConfigShapeError(f"the checkpoint's config nests more than {MAX_DEPTH} levels deep")
    key = (id(obj), depth)
    if key not in memo:
        if isinstance(obj, dict):
            memo[key] = {k: _resolve(v, root, depth, memo, level + 1) for k, v in obj.items()}
        else:
            memo[key] = [_resolve(v, root, depth, memo, level + 1) for v in obj]
    return memo[key]
