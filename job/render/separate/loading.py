"""Demucs' models, loaded for the separation stage.

Models come from the store's ``separation/`` folder, in Demucs' own local-repo layout: a bag
``NAME.yaml`` (``models: [SIG, ...]``, optional ``weights`` and ``segment``) and one package
``SIG-CHECKSUM.th`` per model, where CHECKSUM is the start of the file's sha256. Packages are
loaded without running pickled code (:mod:`job.render.safe_load`), allowing only Demucs' model
classes. With ``allow_download`` a name missing from the store is fetched the normal Demucs way.
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
import yaml

from job.render.safe_load import load_with_inert_objects
from job.render.weights import TooLargeError, build_unfilled, fill, room_for
from shared.errors import CoverError, ErrorCode
from shared.hashing import sha256_of
from shared.model_store import ModelStore


def _demucs_classes() -> dict[tuple[str, str], Any]:
    from demucs.demucs import Demucs
    from demucs.hdemucs import HDemucs
    from demucs.htdemucs import HTDemucs

    return {
        ("demucs.demucs", "Demucs"): Demucs,
        ("demucs.hdemucs", "HDemucs"): HDemucs,
        ("demucs.htdemucs", "HTDemucs"): HTDemucs,
    }


def _find_package(folder: Path, sig: str) -> Path:
    exact = folder / f"{sig}.th"
    if exact.is_file():
        return exact
    matches = sorted(folder.glob(f"{sig}-*.th"))
    if not matches:
        raise CoverError(ErrorCode.MODEL_MISSING, f"Demucs model {sig} is not in {folder}")
    return matches[0]


def _checksum_in_name(path: Path) -> str | None:
    """Demucs names a package ``SIG-CHECKSUM.th``, CHECKSUM being the start of its sha256."""
    return path.stem.rsplit("-", 1)[1] if "-" in path.stem else None


def load_package(path: Path) -> Any:
    """Load one Demucs package (``klass``, ``args``, ``kwargs``, ``state``) safely and strictly."""
    checksum = _checksum_in_name(path)
    if checksum is not None:
        digest = sha256_of(path)
        if not digest.startswith(checksum):
            raise CoverError(
                ErrorCode.MODEL_HASH_MISMATCH,
                f"{path.name}: sha256 starts {digest[: len(checksum)]}, expected {checksum}",
            )
    package = load_with_inert_objects(path, allowed=_demucs_classes())
    try:
        klass, args, kwargs, state = package["klass"], package["args"], package["kwargs"], package["state"]
    except (KeyError, TypeError):
        raise CoverError(ErrorCode.MODEL_CORRUPT, f"{path.name} is not a Demucs package") from None
    if klass not in _demucs_classes().values():
        raise CoverError(ErrorCode.MODEL_UNSAFE, f"{path.name} names a model class that is not Demucs'")
    _check_declared_settings(path, kwargs, state)
    held = sum(t.numel() for t in state.values() if isinstance(t, torch.Tensor))
    try:
        unfilled = build_unfilled(lambda: klass(*args, **kwargs), room_for(state))
    except TooLargeError:
        raise CoverError(ErrorCode.MODEL_CORRUPT, f"{path.name} declares a network larger than it holds") from None
    except (RuntimeError, TypeError, ValueError) as exc:
        raise CoverError(ErrorCode.MODEL_MISMATCH, f"{path.name} does not fit its architecture: {exc}") from None
    declared = sum(t.numel() for t in unfilled.module.state_dict().values())
    if declared != held:
        raise CoverError(ErrorCode.MODEL_CORRUPT, f"{path.name} declares {declared} parameters but holds {held}")
    try:
        return fill(unfilled, dict(state))
    except RuntimeError as exc:
        raise CoverError(ErrorCode.MODEL_MISMATCH, f"{path.name} does not fit its architecture: {exc}") from None


DEMUCS_MAX_SETTING = 1 << 16  # no Demucs setting (channels, nfft, sample rate...) comes near this
# settings that count layers (depth, dconv_depth, t_layers, lstm_layers...): released models use 2 to 7;
# building the declared architecture costs time in their number (a depth of 12,000 took 155 s and
# 1.9 GB on the meta device), and at 64 the worst combination builds in about 2 s
DEMUCS_MAX_LAYERS = 64


def _check_declared_settings(path: Path, kwargs: Any, state: Any) -> None:
    """Settings no Demucs model has are ``model.corrupt`` before anything is built. (The network
    is then built without its initialisation, each tensor sized before it is allocated: a
    declaration past :func:`~job.render.weights.room_for` the package's tensors is refused there,
    one whose parameters differ in number from the package's after it.)"""
    numbers = {k: v for k, v in (kwargs or {}).items() if isinstance(v, int) and not isinstance(v, bool)}
    layers = {k: v for k, v in numbers.items() if str(k).endswith(("depth", "layers"))}
    if (
        any(abs(v) > DEMUCS_MAX_SETTING for v in numbers.values())
        or any(v > DEMUCS_MAX_LAYERS for v in layers.values())
        or not isinstance(state, dict)
    ):
        raise CoverError(ErrorCode.MODEL_CORRUPT, f"{path.name} declares settings no Demucs model has")


def _packages(name: str, store: ModelStore, allow_download: bool) -> tuple[dict[str, Any] | None, list[Path]]:
    """(the bag file's contents or None, the package files) of a separation model in the store."""
    folder = store.separation_dir
    bag_file = folder / f"{name}.yaml"
    if bag_file.is_file():
        bag = yaml.safe_load(bag_file.read_text())
        return bag, [_find_package(folder, sig) for sig in bag["models"]]
    if folder.is_dir() and (list(folder.glob(f"{name}.th")) or list(folder.glob(f"{name}-*.th"))):
        return None, [_find_package(folder, name)]
    if allow_download:
        return None, []
    raise store.missing(
        f"the separation model '{name}'", bag_file, "or set COVER_ALLOW_HUB_DOWNLOAD=1 to let Demucs download it"
    )


def separation_model_digest(name: str, store: ModelStore, allow_download: bool = False) -> str:
    """What identifies a separation model's weights, without loading them: the bag file and each
    package's checksum (from its Demucs name ``SIG-CHECKSUM.th``, verified when it loads; the whole
    file's sha256 for a package named without one)."""
    bag, packages = _packages(name, store, allow_download)
    if not packages:
        return f"demucs-repo:{name}"
    ids = [f"{p.name}:{_checksum_in_name(p) or sha256_of(p)}" for p in packages]
    return hashlib.sha256(json.dumps({"bag": bag, "packages": ids}, sort_keys=True, default=str).encode()).hexdigest()


def load_separator_model(name: str, store: ModelStore, allow_download: bool = False) -> Any:
    """A Demucs model or bag by name from the store (or from Demucs' repo if allowed)."""
    from demucs.apply import BagOfModels

    bag, packages = _packages(name, store, allow_download)
    if not packages:
        from demucs.pretrained import get_model

        return get_model(name).eval()
    models = [load_package(path) for path in packages]
    if bag is None:
        return models[0]
    return BagOfModels(models, bag.get("weights"), bag.get("segment")).eval()


@lru_cache(maxsize=4)
def cached_model(name: str, root: str, allow_download: bool, digest: str) -> Any:
    """One loaded copy per model; ``digest`` in the key, so a model replaced on disk is loaded anew.

    Args:
        name: the separation model's name
        root: the model store's folder
        allow_download: let Demucs fetch a named model the store lacks
        digest: the model's files' digest (a replaced model is another key)
    """
    return load_separator_model(name, ModelStore(Path(root)), allow_download)
