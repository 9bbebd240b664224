"""Stage 2, separate: Demucs splits a song into ``vocals`` and ``no_vocals``.

The :class:`Separator` identifies its model (for the stem cache's key), loads it on first use
(:mod:`job.render.separate.loading`) and streams the song through it a window at a time: memory
stays flat in the song's length, and the stems are written as they are final.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from job.render.compute import (
    ProcessSetting,
    batch_size,
    heap_buffers,
    precision_name,
    release_freed_memory,
    resolve_device,
    resolve_kernels,
    resolve_precision,
)
from job.render.loading import loading
from job.render.media.audio import MIX_SAMPLE_RATE, WavReader, WavWriter
from job.render.separate.loading import cached_model, separation_model_digest
from job.render.separate.stems import StemKey, Stems
from shared.errors import CoverError, ErrorCode
from shared.model_store import ModelStore
from shared.options import SeparationOptions

ProgressFn = Callable[[float], None]
Frames = np.ndarray | WavReader  # [channels, samples]: in memory, or read from the file as sliced


def _mono_stats(mix: Frames, block: int = 1 << 20) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (unbiased) standard deviation of the mono downmix, read block by block: Demucs
    normalises the whole song by them."""
    n = mix.shape[-1]
    total = squares = 0.0
    for start in range(0, n, block):
        mono = np.asarray(mix[:, start : start + block], dtype=np.float64).mean(axis=0)
        total += float(mono.sum())
        squares += float(np.square(mono).sum())
    mean = total / max(n, 1)
    var = max(squares - n * mean * mean, 0.0) / max(n - 1, 1)
    return torch.tensor(mean, dtype=torch.float32), torch.tensor(max(var**0.5, 1e-8), dtype=torch.float32)


class _FunctionalAttention(ProcessSetting):
    """Demucs' self-attention through torch's functional path (``scaled_dot_product_attention``:
    flash attention on the CPU) instead of the native fast path, for as long as any separation
    in this process is inside (``with functional_attention():``).

    In fp32 inference ``nn.MultiheadAttention`` takes torch's native fast path, which on the CPU
    multiplies out the whole attention matrix (8 x 2688 x 2688 per layer in HTDemucs' frequency
    branch) and then softmaxes it: 17 % of a segment's time on an AVX2 CPU. The functional path
    gives the same numbers (4e-7 apart on the real-size model) in 83 % of the time (docs/engine.md,
    "What made it fast"). Under autocast (bf16, fp16) torch already takes the functional path. The switch
    is torch's process-wide ``torch.backends.mha`` flag (nothing else here uses
    ``nn.MultiheadAttention``); concurrent separations share it, the last one out restores it."""

    def __init__(self) -> None:
        super().__init__()
        self._saved = True

    def apply(self) -> None:
        self._saved = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)

    def restore(self) -> None:
        torch.backends.mha.set_fastpath_enabled(self._saved)


functional_attention = _FunctionalAttention()


class Separator:
    """Splits songs into vocals and instrumental. Identifies its model's weights at once (for the
    stem cache key) and loads them on the first separation, then keeps them loaded.

    Args:
        store: the model store
        options: the separation options (defaults when None)
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``
        allow_download: let Demucs fetch a named model the store lacks
        precision: ``auto``, ``fp32``, ``bf16`` or ``fp16``
        kernels: ``fast`` or ``reference`` (the exact path)
        batch: segments per network call (0: 1 on the CPU, 8 on a GPU)
    """

    def __init__(
        self,
        store: ModelStore,
        options: SeparationOptions | None = None,
        device: str = "auto",
        allow_download: bool = False,
        precision: str = "auto",
        kernels: str = "fast",
        batch: int = 0,
    ) -> None:
        self.options = options or SeparationOptions()
        self.device = resolve_device(device)
        self.batch = batch_size(batch, self.device)
        self.dtype = resolve_precision(precision, self.device)
        self.kernels = kernels
        self.fast = resolve_kernels(kernels)
        self.store, self.allow_download = store, allow_download
        self.model_sha256 = separation_model_digest(self.options.model, store, allow_download)
        self._model: Any = None
        self._loading = threading.Lock()

    @property
    def model(self) -> Any:
        """The Demucs model or ``BagOfModels`` (``sources``, ``samplerate``, ``segment``, ``models``, ``weights``)."""
        with self._loading:
            return self._load()

    def _load(self) -> Any:
        if self._model is None:
            with loading(f"the separator ({self.options.model})"):
                model = cached_model(self.options.model, str(self.store.root), self.allow_download, self.model_sha256)
                model.to(self.device)
                # 2-D convolution weights channels-last (fast): the same numbers from faster kernels
                model.to(memory_format=torch.channels_last if self.fast else torch.contiguous_format)
            if "vocals" not in model.sources:
                raise CoverError(ErrorCode.MODEL_MISMATCH, f"model {self.options.model} has no vocals source")
            self._model = model
        return self._model

    def stem_key(self, audio_sha256: str) -> StemKey:
        """What determines this separator's stems of a song (the device does not)."""
        return StemKey(
            audio_sha256=audio_sha256,
            model=self.options.model,
            model_sha256=self.model_sha256,
            segment=self.options.segment,
            overlap=self.options.overlap,
            shifts=self.options.shifts,
            precision=precision_name(self.dtype),
            kernels=self.kernels,
        )

    def _models(self) -> tuple[list[Any], list[list[float]]]:
        """The bag's models and their per-source weights (one model, weight 1, when not a bag)."""
        models = list(getattr(self.model, "models", [self.model]))
        weights = getattr(self.model, "weights", None) or [[1.0] * len(self.model.sources) for _ in models]
        return models, [list(map(float, w)) for w in weights]

    def blocks(self, mix: Frames, progress: ProgressFn | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``[2, samples]`` at 44.1 kHz (an array, or a :class:`WavReader` read as one) -> (vocals,
        no_vocals) blocks, in order, covering the song.

        Demucs' split scheme, run by us so memory stays that of one segment: the song, normalised
        by its overall mean and std, is cut into segments of the model's length every
        ``(1 - overlap) * segment`` samples; each output sample is the triangle-weighted average of
        the segments that cover it, so a stride of output is final once the segment starting there
        is in, and leaves as a block. With ``shifts`` (random time shifts averaged over the whole
        song), or a bag whose models differ in segment length, the song is separated in one piece by
        Demucs' ``apply_model`` (memory then grows with the song).
        """
        from demucs.apply import apply_model

        mean, std = _mono_stats(mix)
        vocal = list(self.model.sources).index("vocals")
        models, weights = self._models()
        seconds = {float(self.options.segment or m.segment) for m in models}
        if self.options.shifts or len(seconds) > 1:
            wav = ((torch.from_numpy(np.asarray(mix[:, 0 : mix.shape[-1]], dtype=np.float32)) - mean) / std)[None]
            with torch.inference_mode(), self._compute():
                out = apply_model(
                    self.model,
                    wav,
                    shifts=self.options.shifts,
                    split=True,
                    overlap=self.options.overlap,
                    device=self.device,
                    segment=self.options.segment,
                )[0].float()
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
        done = 0
        for first in range(0, len(offsets), self.batch):
            estimates = self._estimate(mix, offsets[first : first + self.batch], segment, mean, std, per_source)
            for offset, estimate in zip(offsets[first : first + self.batch], estimates, strict=True):
                n = estimate.shape[-1]
                acc[..., :n] += ramp[:n] * estimate
                weight_sum[:n] += ramp[:n]
                final = min(stride, length - offset)
                yield self._stems(acc[..., :final] / weight_sum[:final], vocal, mean, std)
                acc = torch.cat([acc[..., final:], torch.zeros(*acc.shape[:-1], final)], dim=-1)
                weight_sum = torch.cat([weight_sum[final:], torch.zeros(final)])
                done += 1
                if progress:
                    progress(done / len(offsets))

    def _estimate(
        self,
        mix: Frames,
        offsets: range,
        segment: int,
        mean: torch.Tensor,
        std: torch.Tensor,
        per_source: torch.Tensor,
    ) -> list[torch.Tensor]:
        """The weighted sources ``[sources, 2, n]`` of the segments starting at ``offsets``, in one
        network call per model (a batch): each segment padded with the song around it exactly as
        Demucs' ``apply_model`` pads one (zeros only beyond the song's ends), then trimmed back."""
        from demucs.apply import TensorChunk
        from demucs.htdemucs import HTDemucs
        from demucs.utils import center_trim

        length = mix.shape[-1]
        chunks = []
        for offset in offsets:
            # the segment with the song around it that the padding may reach (half a segment
            # before, to the segment's end after), normalised
            lo, hi = max(0, offset - segment), min(length, offset + 2 * segment)
            window = (torch.from_numpy(np.array(mix[:, lo:hi], dtype=np.float32)) - mean) / std
            chunks.append(TensorChunk(window[None], offset - lo, segment))
        models, _ = self._models()
        total: list[torch.Tensor] = [torch.zeros(0)] * len(chunks)
        for i, model in enumerate(models):
            if isinstance(model, HTDemucs) and self.options.segment is not None:
                valid = [int(self.options.segment * model.samplerate)] * len(chunks)
            elif hasattr(model, "valid_length"):
                valid = [model.valid_length(c.length) for c in chunks]
            else:
                valid = [c.length for c in chunks]
            with torch.inference_mode(), self._compute():
                for target in sorted(set(valid)):  # one call per padded length (all but the last share one)
                    members = [j for j, v in enumerate(valid) if v == target]
                    batch = torch.cat([chunks[j].padded(target) for j in members]).to(self.device)
                    out = model(batch).float() * per_source[i][:, None, None]
                    for k, j in enumerate(members):
                        part = center_trim(out[k], chunks[j].length).cpu()
                        total[j] = part if i == 0 else total[j] + part
        return total

    @contextmanager
    def _compute(self) -> Iterator[None]:
        """How the network computes: autocast when the precision asks for it (convolutions and
        matmuls in bf16 or fp16; the STFT, norms and softmax stay fp32), and with the fast kernels
        on the CPU, attention through the functional path (:data:`functional_attention`)."""
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            if self.fast and self.device.type == "cpu":
                with functional_attention():
                    yield
            else:
                yield

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
        # the song is read a segment's window at a time with plain reads (a memory map's pages
        # stay resident once touched: 212 MB of a 10-minute song by the end)
        with WavReader(song_wav) as mix:
            rate = mix.sample_rate
            if rate != MIX_SAMPLE_RATE or mix.channels != 2:
                got = f"{rate} Hz x {mix.channels}"
                raise CoverError(ErrorCode.INTERNAL, f"separator expects 44.1 kHz stereo, got {got}")
            with (  # the fast kernels reuse Demucs' large buffers from the heap (heap_buffers)
                heap_buffers() if self.fast and self.device.type == "cpu" else nullcontext(),
                WavWriter(out_dir / "vocals.wav", rate, 2) as vocals,
                WavWriter(out_dir / "no_vocals.wav", rate, 2) as no_vocals,
            ):
                for vocal_block, rest_block in self.blocks(mix, progress):
                    vocals.write(vocal_block)
                    no_vocals.write(rest_block)
        # a separation leaves 300 to 400 MB of freed heap (3.5-minute song, real-size htdemucs) that
        # the conversion's large buffers, mapped afresh, would not reuse: hand it back
        release_freed_memory()
        return Stems(vocals=vocals.path, no_vocals=no_vocals.path, sample_rate=rate)
