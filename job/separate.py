"""Stage 2, separate: Demucs splits a song into ``vocals`` and ``no_vocals``.

Models come from the store's ``separation/`` folder, in Demucs' own local-repo layout: a bag
``NAME.yaml`` (``models: [SIG, ...]``, optional ``weights`` and ``segment``) and one package
``SIG-CHECKSUM.th`` per model, where CHECKSUM is the start of the file's sha256. Packages are
loaded without running pickled code (:mod:`shared.safe_load`), allowing only Demucs' model
classes. With ``allow_download`` a name missing from the store is fetched the normal Demucs way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from pydantic import BaseModel, Field

from job.audio import MIX_SAMPLE_RATE, WavWriter, read_wav
from job.compute import resolve_device, resolve_kernels, resolve_precision
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


def _mono_stats(mix: np.ndarray, block: int = 1 << 20) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (unbiased) standard deviation of the mono downmix, read block by block: Demucs
    normalises the whole song by them."""
    n = mix.shape[-1]
    total = squares = 0.0
    for start in range(0, n, block):
        mono = np.asarray(mix[:, start:start + block], dtype=np.float64).mean(axis=0)
        total += float(mono.sum())
        squares += float(np.square(mono).sum())
    mean = total / max(n, 1)
    var = max(squares - n * mean * mean, 0.0) / max(n - 1, 1)
    return torch.tensor(mean, dtype=torch.float32), torch.tensor(max(var ** 0.5, 1e-8), dtype=torch.float32)


class Separator:
    """Splits songs into vocals and instrumental. Keeps its model loaded between songs."""

    def __init__(self, models_dir: Path, options: SeparationOptions | None = None,
                 allow_download: bool = False, precision: str = "auto", kernels: str = "fast") -> None:
        self.options = options or SeparationOptions()
        self.device = resolve_device(self.options.device)
        self.dtype = resolve_precision(precision, self.device)
        self.model = _cached_model(self.options.model, str(Path(models_dir) / "separation"), allow_download)
        self.model.to(self.device)
        # 2-D convolution weights channels-last (fast): the same numbers from faster kernels
        fast = resolve_kernels(kernels)
        self.model.to(memory_format=torch.channels_last if fast else torch.contiguous_format)
        if "vocals" not in self.model.sources:
            raise CoverError(ErrorCode.MODEL_MISMATCH, f"model {self.options.model} has no vocals source")

    def _models(self) -> tuple[list[torch.nn.Module], list[list[float]]]:
        """The bag's models and their per-source weights (one model, weight 1, when not a bag)."""
        models = list(getattr(self.model, "models", [self.model]))
        weights = getattr(self.model, "weights", None) or [[1.0] * len(self.model.sources) for _ in models]
        return models, [list(map(float, w)) for w in weights]

    def blocks(self, mix: np.ndarray, progress: ProgressFn | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``[2, samples]`` at 44.1 kHz -> (vocals, no_vocals) blocks, in order, covering the song.

        Demucs' split scheme, run by us so memory stays that of one segment: the song, normalised
        by its overall mean and std, is cut into segments of the model's length every
        ``(1 - overlap) * segment`` samples; each output sample is the triangle-weighted average of
        the segments that cover it, so a stride of output is final once the segment starting there
        is in, and leaves as a block. With ``shifts`` (random time shifts averaged over the whole
        song), or a bag whose models differ in segment length, the song is separated in one piece by
        Demucs' ``apply_model`` (memory then grows with the song).
        """
        from demucs.apply import TensorChunk, apply_model

        mean, std = _mono_stats(mix)
        vocal = list(self.model.sources).index("vocals")
        models, weights = self._models()
        seconds = {float(self.options.segment or m.segment) for m in models}
        if self.options.shifts or len(seconds) > 1:
            wav = ((torch.from_numpy(np.asarray(mix, dtype=np.float32)) - mean) / std)[None]
            with torch.inference_mode(), self._autocast():
                out = apply_model(self.model, wav, shifts=self.options.shifts, split=True,
                                  overlap=self.options.overlap, device=self.device, segment=self.options.segment)[0].float()
            yield self._stems(out, vocal, mean, std)
            if progress:
                progress(1.0)
            return

        per_source = torch.tensor(weights)  # [models, sources]
        per_source = (per_source / per_source.sum(0)).to(self.device)
        length = mix.shape[-1]
        segment = int(self.model.samplerate * seconds.pop())
        stride = max(1, int((1 - self.options.overlap) * segment))
        ramp = torch.cat([torch.arange(1, segment // 2 + 1), torch.arange(segment - segment // 2, 0, -1)]).float()
        ramp = ramp / ramp.max()
        acc = torch.zeros(len(self.model.sources), 2, segment)  # output from sample `offset` on
        weight_sum = torch.zeros(segment)
        offsets = range(0, length, stride)
        for done, offset in enumerate(offsets, start=1):
            # the segment with the song around it that Demucs' padding may reach (half a segment
            # before, to the segment's end after), normalised; zeros only beyond the song's ends
            lo, hi = max(0, offset - segment), min(length, offset + 2 * segment)
            window = (torch.from_numpy(np.array(mix[:, lo:hi], dtype=np.float32)) - mean) / std
            chunk = TensorChunk(window[None], offset - lo, segment)
            with torch.inference_mode(), self._autocast():
                estimate = sum(apply_model(m, chunk, shifts=0, split=False, device=self.device,
                                           segment=self.options.segment)[0].float() * per_source[i][:, None, None]
                               for i, m in enumerate(models)).cpu()
            n = estimate.shape[-1]
            acc[..., :n] += ramp[:n] * estimate
            weight_sum[:n] += ramp[:n]
            final = min(stride, length - offset)
            yield self._stems(acc[..., :final] / weight_sum[:final], vocal, mean, std)
            acc = torch.cat([acc[..., final:], torch.zeros(*acc.shape[:-1], final)], dim=-1)
            weight_sum = torch.cat([weight_sum[final:], torch.zeros(final)])
            if progress:
                progress(done / len(offsets))

    def _autocast(self) -> torch.autocast:
        """bf16 autocast when the precision asks for it (convolutions and matmuls in bf16; the
        STFT, norms and softmax stay fp32)."""
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    @staticmethod
    def _stems(out: torch.Tensor, vocal: int, mean: torch.Tensor, std: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        out = out * std + mean
        vocals = out[vocal]
        return vocals.numpy(), (out.sum(0) - vocals).numpy()

    def separate_array(self, mix: np.ndarray, progress: ProgressFn | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``[2, samples]`` at 44.1 kHz -> (vocals, no_vocals), both ``[2, samples]``, whole."""
        parts = list(self.blocks(mix, progress))
        return np.concatenate([p[0] for p in parts], axis=-1), np.concatenate([p[1] for p in parts], axis=-1)

    def separate(self, song_wav: Path, out_dir: Path, progress: ProgressFn | None = None) -> Stems:
        mix, rate = read_wav(song_wav, mmap=True)
        if rate != MIX_SAMPLE_RATE or mix.shape[0] != 2:
            raise CoverError(ErrorCode.INTERNAL, f"separator expects 44.1 kHz stereo, got {rate} Hz x {mix.shape[0]}")
        with WavWriter(out_dir / "vocals.wav", rate, 2) as vocals, \
                WavWriter(out_dir / "no_vocals.wav", rate, 2) as no_vocals:
            for vocal_block, rest_block in self.blocks(mix, progress):
                vocals.write(vocal_block)
                no_vocals.write(rest_block)
        return Stems(vocals=vocals.path, no_vocals=no_vocals.path, sample_rate=rate)
