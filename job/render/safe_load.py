"""Loading pickled checkpoints without running code from them.

Two ways, both refusing to call anything a file names that we did not allow:

* :func:`load_weights_only` is torch's own ``weights_only`` loader: tensors, containers and
  primitives only. RVC voices and RMVPE state dicts are exactly that.
* :func:`load_with_inert_objects` also reads checkpoints that carry configuration objects of
  libraries we do not install (fairseq's ``hubert_base.pt`` holds omegaconf and argparse objects;
  Demucs packages name their model class). Every global outside an allow-list is replaced by an
  inert placeholder that only records the arguments and state it is given, so a malicious
  ``__reduce__`` (``os.system`` and friends) becomes a harmless record instead of a call.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from shared.errors import CoverError, ErrorCode


class Inert:
    """Placeholder for a pickled object of a class we refuse to import."""

    __qualified_name__ = "?"
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = {}  # noqa: RUF012 - each instance assigns its own
    state: Any = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args
        self.kwargs = kwargs

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<inert {self.__qualified_name__}>"


def _inert_class(module: str, name: str) -> type[Inert]:
    return type(name, (Inert,), {"__qualified_name__": f"{module}.{name}"})


_ALWAYS_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): __import__("collections").OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor"): torch._utils._rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch", "Size"): torch.Size,
    ("torch", "device"): torch.device,
    ("fractions", "Fraction"): __import__("fractions").Fraction,
}
for _dtype in ("float16", "float32", "float64", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool"):
    _ALWAYS_ALLOWED[("torch", _dtype)] = getattr(torch, _dtype)
for _name, _obj in (
    ("dict", dict),
    ("list", list),
    ("tuple", tuple),
    ("set", set),
    ("frozenset", frozenset),
    ("int", int),
    ("float", float),
    ("str", str),
    ("bytes", bytes),
    ("bool", bool),
    ("complex", complex),
):
    _ALWAYS_ALLOWED[("builtins", _name)] = _obj
    _ALWAYS_ALLOWED[("__builtin__", _name)] = _obj


def _pickle_module(allowed: dict[tuple[str, str], Any]) -> SimpleNamespace:
    table = {**_ALWAYS_ALLOWED, **allowed}

    class InertUnpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            obj = table.get((module, name))
            return obj if obj is not None else _inert_class(module, name)

    def load(file: Any, **kwargs: Any) -> Any:
        return InertUnpickler(file, **kwargs).load()

    return SimpleNamespace(Unpickler=InertUnpickler, load=load, __name__="job.render.safe_load.inert_pickle")


def _describe(path: Path, exc: Exception) -> CoverError:
    text = str(exc)
    if "Unsupported global" in text or "GLOBAL" in text:
        return CoverError(
            ErrorCode.MODEL_UNSAFE,
            f"{path.name} holds Python objects that would run code when loaded; it was refused "
            "and nothing in it was executed",
        )
    # torch's weights-only errors open with advice to turn safe loading off: never pass that on
    reasons = [
        line.removeprefix("WeightsUnpickler error:").strip()
        for line in text.splitlines()
        if line.strip() and "weights_only" not in line and not line.startswith("Weights only load failed")
    ]
    return CoverError(
        ErrorCode.MODEL_CORRUPT,
        f"{path.name} is not a readable checkpoint: {reasons[0] if reasons else type(exc).__name__}",
    )


def _check_file(path: Path) -> None:
    if not path.is_file():
        raise CoverError(ErrorCode.MODEL_MISSING, f"model file not found: {path}")
    if path.stat().st_size == 0:
        raise CoverError(ErrorCode.MODEL_CORRUPT, f"{path.name} is empty")


# what a damaged or hostile checkpoint makes torch.load raise
LOAD_ERRORS = (
    pickle.UnpicklingError,
    RuntimeError,
    EOFError,
    ValueError,
    zipfile.BadZipFile,
    KeyError,
    AttributeError,
    TypeError,
    IndexError,
    OSError,
)


def check_tensors(obj: Any, name: str, depth: int = 0) -> None:
    """Refuse tensors that claim more elements than their storage holds (stride tricks: a view of a
    few bytes declaring gigabytes, which the first copy would allocate)."""
    if depth > 32:
        return
    if isinstance(obj, torch.Tensor):
        needed = (obj.storage_offset() + obj.numel()) * obj.element_size()
        if obj.numel() and needed > obj.untyped_storage().nbytes():
            raise CoverError(
                ErrorCode.MODEL_CORRUPT, f"{name} holds a tensor of shape {tuple(obj.shape)} over a smaller storage"
            )
    elif isinstance(obj, dict):
        for value in obj.values():
            check_tensors(value, name, depth + 1)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            check_tensors(value, name, depth + 1)
    elif isinstance(obj, Inert):
        check_tensors(obj.state, name, depth + 1)


def _load(path: Path, **options: Any) -> Any:
    """``torch.load`` with our checks around it: the file, the errors, the tensors' real sizes."""
    path = Path(path)
    _check_file(path)
    try:
        loaded = torch.load(path, map_location="cpu", **options)
    except MemoryError:
        raise CoverError(ErrorCode.MODEL_CORRUPT, f"{path.name} declares more data than memory holds") from None
    except LOAD_ERRORS as exc:
        raise _describe(path, exc) from None
    check_tensors(loaded, path.name)
    return loaded


def load_weights_only(path: Path) -> Any:
    """Load a checkpoint that must hold only tensors, containers and primitives."""
    return _load(path, weights_only=True)


def load_with_inert_objects(path: Path, allowed: dict[tuple[str, str], Any] | None = None) -> Any:
    """Load a checkpoint whose foreign objects become :class:`Inert` records.

    ``allowed`` maps ``(module, name)`` to real objects that may be instantiated (for example the
    Demucs model classes, whose constructors only build modules).
    """
    return _load(path, weights_only=False, pickle_module=_pickle_module(allowed or {}))
