"""Stage 2, separate: Demucs splits a song into ``vocals`` and ``no_vocals``.

Models come from the store's ``separation/`` folder, in Demucs' own local-repo layout: a bag
``NAME.yaml`` (``models: [SIG, ...]``, optional ``weights`` and ``segment``) and one package
``SIG-CHECKSUM.th`` per model, where CHECKSUM is the start of the file's sha256. Packages are
loaded without running pickled code (:mod:`shared.safe_load`), allowing only Demucs' model
classes. With ``allow_download`` a name missing from the store is fetched the normal Demucs way.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from pydantic import BaseModel, Field

from job.audio import MIX_SAMPLE_RATE, read_wav, write_wav
from shared.errors import CoverError, ErrorCode
from shared.hashing import sha256_of
from shared.safe_load import load_with_inert_objects

ProgressFn = Callable[[float], None]


class SeparationOptions(BaseModel):
    model: str = Field("htdemucs", description="Demucs model or bag name.")
    segment: float | None = Field(None, gt=0, description="Chunk length in seconds; None: the model's own.")
    overlap: float = Field(0.25, ge=0, lt=1, description="Overlap between chunks.")
    shifts: int = Field(0, ge=0, le=10, description="Random-shift averaging passes (0: deterministic).")
    device: str = Field("auto", description="'auto', 'cpu', 'cuda', 'cuda:N'.")


class Stems(BaseModel):
    vocals: Path
    no_vocals: Path
    sample_rate: int


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _demucs_classes() -> dict[tuple[str, str], Any]:
    from demucs.demucs import Demucs
    from demucs.hdemucs import HDemucs
    from demucs.htdemucs import HTDemucs

    return {("demucs.demucs", "Demucs"): Demucs, ("demucs.hdemucs", "HDemucs"): HDemucs,
            ("demucs.htdemucs", "HTDemucs"): HTDemucs}


def _find_package(folder: Path, sig: str) -> Path:
    exact = folder / f"{sig}.th"
    if exact.is_file():
        return exact
    matches = sorted(folder.glob(f"{sig}-*.th"))
    if not matches:
        raise CoverError(ErrorCode.MODEL_MISSING, f"Demucs model {sig} is not in {folder}")
    return matches[0]


def load_package(path: Path) -> torch.nn.Module:
    """Load one Demucs package (``klass``, ``args``, ``kwargs``, ``state``) safely and strictly."""
    if "-" in path.stem:
        checksum = path.stem.rsplit("-", 1)[1]
        digest = sha256_of(path)
        if not digest.startswith(checksum):
            raise CoverError(ErrorCode.MODEL_HASH_MISMATCH,
                             f"{path.name}: sha256 starts {digest[:len(checksum)]}, expected {checksum}")
    package = load_with_inert_objects(path, allowed=_demucs_classes())
    try:
        klass, args, kwargs, state = package["klass"], package["args"], package["kwargs"], package["state"]
    except (KeyError, TypeError):
        raise CoverError(ErrorCode.MODEL_CORRUPT, f"{path.name} is not a Demucs package") from None
    if klass not in _demucs_classes().values():
        raise CoverError(ErrorCode.MODEL_UNSAFE, f"{path.name} names a model class that is not Demucs'")
    try:
        model = klass(*args, **kwargs)
        model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    except (RuntimeError, TypeError) as exc:
        raise CoverError(ErrorCode.MODEL_MISMATCH, f"{path.name} does not fit its architecture: {exc}") from None
    return model.eval()


def load_separator_model(name: str, folder: Path, allow_download: bool = False) -> torch.nn.Module:
    """A Demucs model or bag by name from ``folder`` (or from the Demucs repo if allowed)."""
    from demucs.apply import BagOfModels

    bag_file = folder / f"{name}.yaml"
    if bag_file.is_file():
        bag = yaml.safe_load(bag_file.read_text())
        models = [load_package(_find_package(folder, sig)) for sig in bag["models"]]
        return BagOfModels(models, bag.get("weights"), bag.get("segment")).eval()
    if folder.is_dir() and (list(folder.glob(f"{name}.th")) or list(folder.glob(f"{name}-*.th"))):
        return load_package(_find_package(folder, name))
    if allow_download:
        from demucs.pretrained import get_model

        return get_model(name).eval()
    raise CoverError(
        ErrorCode.MODEL_MISSING,
        f"separation model '{name}' is not in {folder}; put it there (Demucs' local-repo layout) "
        "or set COVER_ALLOW_HUB_DOWNLOAD=1 to let Demucs download it",
    )


@lru_cache(maxsize=4)
def _cached_model(name: str, folder: str, allow_download: bool) -> torch.nn.Module:
    return load_separator_model(name, Path(folder), allow_download)


class Separator:
    """Splits songs into vocals and instrumental. Keeps its model loaded between songs."""

    def __init__(self, models_dir: Path, options: SeparationOptions | None = None,
                 allow_download: bool = False) -> None:
        self.options = options or SeparationOptions()
        self.device = resolve_device(self.options.device)
        self.model = _cached_model(self.options.model, str(Path(models_dir) / "separation"), allow_download)
        self.model.to(self.device)
        if "vocals" not in self.model.sources:
            raise CoverError(ErrorCode.MODEL_MISMATCH, f"model {self.options.model} has no vocals source")

    def separate_array(self, mix: np.ndarray, progress: ProgressFn | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``[2, samples]`` at 44.1 kHz -> (vocals, no_vocals), both ``[2, samples]``."""
        from demucs.apply import apply_model

        wav = torch.from_numpy(np.ascontiguousarray(mix, dtype=np.float32))
        ref = wav.mean(0)
        mean, std = ref.mean(), ref.std().clamp_min(1e-8)
        wav = (wav - mean) / std
        counter = {"done": 0}
        length = wav.shape[-1]
        segment = self.options.segment or float(getattr(self.model, "segment", 7.8))
        stride = max(1, int((1 - self.options.overlap) * segment * MIX_SAMPLE_RATE))
        n_models = len(getattr(self.model, "models", [self.model]))
        total = max(1, -(-length // stride)) * n_models * max(1, self.options.shifts)

        def callback(info: dict) -> None:
            if info.get("state") == "end":
                counter["done"] += 1
                if progress:
                    progress(min(1.0, counter["done"] / total))

        with torch.inference_mode():
            out = apply_model(self.model, wav[None], shifts=self.options.shifts, split=True,
                              overlap=self.options.overlap, device=self.device,
                              segment=self.options.segment, callback=callback)[0]
        out = (out * std + mean).cpu()
        sources = list(self.model.sources)
        vocals = out[sources.index("vocals")]
        no_vocals = out.sum(0) - vocals
        if progress:
            progress(1.0)
        return vocals.numpy(), no_vocals.numpy()

    def separate(self, song_wav: Path, out_dir: Path, progress: ProgressFn | None = None) -> Stems:
        mix, rate = read_wav(song_wav)
        if rate != MIX_SAMPLE_RATE or mix.shape[0] != 2:
            raise CoverError(ErrorCode.INTERNAL, f"separator expects 44.1 kHz stereo, got {rate} Hz x {mix.shape[0]}")
        vocals, no_vocals = self.separate_array(mix, progress)
        return Stems(vocals=write_wav(out_dir / "vocals.wav", vocals, rate),
                     no_vocals=write_wav(out_dir / "no_vocals.wav", no_vocals, rate), sample_rate=rate)
