"""The HiFi-GAN decoder, with the neural-source-filter (NSF) harmonic source for pitch models.

``upp`` (the product of the upsample rates) turns 100 frames per second into the model's
sample rate: 320 for 32 kHz, 400 for 40 kHz, 480 for 48 kHz.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from fractions import Fraction
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

LRELU_SLOPE = 0.1
SINE_AMP = 0.1
NOISE_STD = 0.003
# another runtime's copy of the layers (the int8 decoder): [B, C, T] float32 in, [B, 1, T * upp] out
Layers = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]
TILE_FRAMES = 400  # 4 s of output per decoder tile: bf16 (tuned on the Xeon with AMX)
# fp32 (AVX2 CPUs, COVER_PRECISION=fp32): 2 s tiles. 60 s of vocals on the 2-core AMD EPYC, real-size
# voice, two rounds each: 103-108 s with 4 s tiles, 79-85 s with 2 s; the decoder's peak 254-305 -> 149-163 MB.
# The int8 decoder (its back in fp32) too: 20 s of demo vocals, 0.82 of fp32's time with 4 s tiles, 0.77 with 2 s
TILE_FRAMES_FP32 = 200
# A tile's margin either side is what reaches a kept frame (Generator.context_frames: 10 frames for the
# standard 48 kHz v2 decoder, 13 for v1 32 kHz), so a tiled decode is the whole decode's to float32
# rounding. It was 16 frames for every decoder until 2026-12-07: 232 frames decoded per 200 kept instead
# of 220 for 48 kHz, 5 % of the decoder's work.
TILE_QUANTUM = 25  # a chunk's last tile keeps its frames rounded up to this (0.25 s), not a whole tile's
# A tile's time is its frames' (int8 front, 2 threads, AMD EPYC: 3.2 ms per frame from 45 to 220 frames), so
# the last tile of a chunk decodes what it keeps plus margins instead of sliding back to a whole tile: at most
# tile / TILE_QUANTUM shapes (8 at 2 s, 16 at 4 s) for the kernels built per shape, 9 to 12 % fewer frames
# decoded on phrases between silences (the song-form demo song's vocal track: 178.2 -> 162.5 s decoded for
# 140.8 s kept), 5 % on vocals that never stop (bench/JOURNAL.md, twelfth session).


def tile_frames(dtype: torch.dtype, layers: Layers | None = None) -> int:
    """Frames of output per decoder tile for the torch layers in ``dtype`` (or ``layers``: the int8
    decoder, whose back runs in fp32)."""
    return TILE_FRAMES_FP32 if layers is not None or dtype == torch.float32 else TILE_FRAMES


def _padding(kernel_size: int, dilation: int = 1) -> int:
    return (kernel_size * dilation - dilation) // 2


def _reach(conv: nn.Module) -> tuple[Fraction, Fraction]:
    """How far before and after an output sample its inputs lie, in the layer's input samples. A
    convolution's output ``j`` (at input position ``j * stride``) reads the inputs ``j * stride -
    padding + k * dilation``; a transposed one's output ``n`` (at input position ``n / stride``)
    reads the ``i`` with ``n = i * stride - padding + k``."""
    assert isinstance(conv, nn.Conv1d | nn.ConvTranspose1d), conv
    kernel, dilation, stride = conv.kernel_size[0], conv.dilation[0], conv.stride[0]
    padding = cast(tuple[int, ...], conv.padding)[0]
    span = (kernel - 1) * dilation
    if isinstance(conv, nn.ConvTranspose1d):
        return Fraction(span - padding, stride), Fraction(padding, stride)
    return Fraction(padding), Fraction(span - padding)


def _widest(blocks: Iterable[nn.Module]) -> tuple[Fraction, Fraction]:
    """The reach of residual blocks run side by side: each block's convolutions in a chain."""
    reaches = [[_reach(c) for c in b.modules() if isinstance(c, nn.Conv1d)] for b in blocks]
    return max(sum((r[0] for r in chain), Fraction(0)) for chain in reaches), max(
        sum((r[1] for r in chain), Fraction(0)) for chain in reaches
    )


# --- the fast layout ----------------------------------------------------------------------------
# A [B, C, T] signal also travels as [B, C, 1, T] in channels-last memory (time-major, channels
# innermost), where oneDNN runs its 2-D blocked kernels: on this Xeon (AMX), a 128-channel,
# 11-tap convolution over 4 s at 12 kHz took 7.5 ms in bf16 against 34 ms for the same conv1d,
# and 52 ms against 69 ms in fp32. Every layer below takes either form; the 2-D weights are made
# once per dtype and remade when the parameters change (load_state_dict bumps their version).


def to_fast_layout(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, C, T] -> [B, C, 1, T] channels-last in ``dtype``."""
    return x.unsqueeze(2).to(dtype).contiguous(memory_format=torch.channels_last)


def _packed(module: nn.Conv1d | nn.ConvTranspose1d, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    key = (dtype, id(module.weight), module.weight._version)
    cache = module.__dict__.get("_packed_cache")
    if cache is None or cache[0] != key:
        weight = module.weight.detach().unsqueeze(2).to(dtype).contiguous(memory_format=torch.channels_last)
        bias = module.bias.detach().to(dtype) if module.bias is not None else None
        cache = (key, weight, bias)
        module.__dict__["_packed_cache"] = cache  # not a parameter or buffer: no state-dict key
    return cache[1], cache[2]


class Conv1d(nn.Conv1d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:
            return super().forward(x)
        weight, bias = _packed(self, x.dtype)
        padding = cast(tuple[int, ...], self.padding)
        return F.conv2d(x, weight, bias, (1, self.stride[0]), (0, padding[0]), (1, self.dilation[0]), self.groups)


class ConvTranspose1d(nn.ConvTranspose1d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        if x.dim() == 3:
            return super().forward(x)
        weight, bias = _packed(self, x.dtype)
        return F.conv_transpose2d(
            x,
            weight,
            bias,
            (1, self.stride[0]),
            (0, cast(tuple[int, ...], self.padding)[0]),
            (0, self.output_padding[0]),
            self.groups,
            (1, self.dilation[0]),
        )


class ResBlock1(nn.Module):
    def __init__(self, channels: int, kernel_size: int, dilation: tuple[int, ...]) -> None:
        super().__init__()
        self.convs1 = nn.ModuleList(
            Conv1d(channels, channels, kernel_size, dilation=d, padding=_padding(kernel_size, d)) for d in dilation
        )
        self.convs2 = nn.ModuleList(
            Conv1d(channels, channels, kernel_size, padding=_padding(kernel_size)) for _ in dilation
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for c1, c2 in zip(self.convs1, self.convs2):
            x = x + c2(F.leaky_relu(c1(F.leaky_relu(x, LRELU_SLOPE)), LRELU_SLOPE))
        return x


class ResBlock2(nn.Module):
    def __init__(self, channels: int, kernel_size: int, dilation: tuple[int, ...]) -> None:
        super().__init__()
        self.convs = nn.ModuleList(
            Conv1d(channels, channels, kernel_size, dilation=d, padding=_padding(kernel_size, d)) for d in dilation[:2]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for c in self.convs:
            x = x + c(F.leaky_relu(x, LRELU_SLOPE))
        return x


class SourceModuleHnNSF(nn.Module):
    """Sine excitation at the f0 (``l_linear`` merges the harmonics; one harmonic in RVC)."""

    def __init__(self, sample_rate: int, harmonic_num: int = 0) -> None:
        super().__init__()
        self.sample_rate = sample_rate
        self.harmonic_num = harmonic_num
        self.l_linear = nn.Linear(harmonic_num + 1, 1)

    def forward(self, f0: torch.Tensor, upp: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``f0`` [B, frames] in Hz (0 = unvoiced) -> excitation [B, 1, frames * upp]."""
        f0_up = f0.double().repeat_interleave(upp, dim=1)  # [B, N]
        harmonics = torch.arange(1, self.harmonic_num + 2, device=f0.device, dtype=torch.float64)
        # float64 phase accumulation: no drift over minutes of audio
        phase = torch.cumsum(f0_up[..., None] * harmonics / self.sample_rate, dim=1) % 1.0
        sine = (torch.sin(2 * math.pi * phase) * SINE_AMP).to(f0.dtype)
        voiced = (f0_up > 0).to(f0.dtype)[..., None]
        noise_amp = voiced * NOISE_STD + (1 - voiced) * SINE_AMP / 3
        noise = torch.randn(sine.shape, generator=generator, device=f0.device, dtype=f0.dtype)
        excitation = sine * voiced + noise_amp * noise
        return torch.tanh(self.l_linear(excitation)).transpose(1, 2)


class Generator(nn.Module):
    """The HiFi-GAN decoder, with the NSF harmonic source when the voice has pitch.

    Args:
        initial_channel: the latent's channels
        resblock: ``1`` or ``2``, the residual block's kind
        resblock_kernel_sizes: the residual blocks' kernels
        resblock_dilation_sizes: their dilations
        upsample_rates: each upsampling step's factor (their product: samples per frame)
        upsample_initial_channel: the first upsampling step's channels (halved at each)
        upsample_kernel_sizes: the upsampling steps' kernels
        gin_channels: the speaker embedding's channels
        sample_rate: the output's rate (the NSF source's; None: a decoder without pitch)
    """

    def __init__(
        self,
        initial_channel: int,
        resblock: str,
        resblock_kernel_sizes: list[int],
        resblock_dilation_sizes: list[list[int]],
        upsample_rates: list[int],
        upsample_initial_channel: int,
        upsample_kernel_sizes: list[int],
        gin_channels: int,
        sample_rate: int | None = None,
    ) -> None:
        super().__init__()
        self.num_kernels = len(resblock_kernel_sizes)
        self.upp = math.prod(upsample_rates)
        self.conv_pre = Conv1d(initial_channel, upsample_initial_channel, 7, 1, padding=3)
        block = ResBlock1 if str(resblock) == "1" else ResBlock2
        self.ups = nn.ModuleList()
        self.noise_convs = nn.ModuleList() if sample_rate else None
        ch = upsample_initial_channel
        for i, (u, k) in enumerate(zip(upsample_rates, upsample_kernel_sizes)):
            ch = upsample_initial_channel // (2 ** (i + 1))
            self.ups.append(ConvTranspose1d(upsample_initial_channel // (2**i), ch, k, u, padding=(k - u) // 2))
            if self.noise_convs is not None:
                if i + 1 < len(upsample_rates):
                    stride = math.prod(upsample_rates[i + 1 :])
                    self.noise_convs.append(Conv1d(1, ch, kernel_size=stride * 2, stride=stride, padding=stride // 2))
                else:
                    self.noise_convs.append(Conv1d(1, ch, kernel_size=1))
        self.resblocks = nn.ModuleList(
            block(upsample_initial_channel // (2 ** (i + 1)), k, tuple(d))
            for i in range(len(self.ups))
            for k, d in zip(resblock_kernel_sizes, resblock_dilation_sizes)
        )
        self.conv_post = Conv1d(ch, 1, 7, 1, padding=3, bias=False)
        self.cond = Conv1d(gin_channels, upsample_initial_channel, 1) if gin_channels else None
        self.m_source = SourceModuleHnNSF(sample_rate) if sample_rate else None
        self.margin = self.context_frames()

    def context_frames(self) -> int:
        """The frames of context a decoder tile needs either side so that every frame it keeps is the
        whole decode's.

        An output sample at position ``p`` (in frames: sample ``n`` is at ``n / upp``) reads the
        latent frames in ``[p - before, p + after]`` and the excitation's samples in the same kind of
        span, each layer adding its reach (:func:`_reach`, converted to frames) along the path: a
        residual stage counts its widest block, and the excitation enters at each stage through a
        convolution of its own. A tile keeps the frames ``[start, start + tile)`` and holds the latent
        frames ``[start - m, start + tile + m)`` and the excitation over the same span, so ``m`` must
        cover the latent's whole frames before its first kept sample and after its last one (``1 /
        upp`` before the next frame), and the excitation's samples likewise. Checked against the
        exact dependencies (autograd) for every standard configuration: 10 frames for 48 kHz v2.
        """
        steps: list[tuple[Fraction, Fraction]] = []  # (before, after) of each layer on the latent's path, in frames
        entries: list[tuple[int, tuple[Fraction, Fraction]]] = []  # where the excitation enters, its reach
        rate = 1  # samples per frame at the current layer's input

        def add(reach: tuple[Fraction, Fraction]) -> None:
            steps.append((reach[0] / rate, reach[1] / rate))

        def path(first: int) -> tuple[Fraction, Fraction]:
            return sum((b for b, _ in steps[first:]), Fraction(0)), sum((a for _, a in steps[first:]), Fraction(0))

        add(_reach(self.conv_pre))
        for i, up in enumerate(self.ups):
            add(_reach(up))
            rate *= cast(nn.ConvTranspose1d, up).stride[0]
            if self.noise_convs is not None:
                before, after = _reach(self.noise_convs[i])
                entries.append((len(steps), (before / self.upp, after / self.upp)))
            add(_widest(self.resblocks[i * self.num_kernels : (i + 1) * self.num_kernels]))
        add(_reach(self.conv_post))
        before, after = path(0)
        # whole latent frames: the first at or after p - before, the last at or before p + after
        need = [math.floor(before), math.floor(after - Fraction(1, self.upp)) + 1]
        for at, (src_before, src_after) in entries:  # excitation samples: positions in steps of 1 / upp
            rest = path(at)
            need += [math.ceil(src_before + rest[0]), math.ceil(src_after + rest[1])]
        return max(need)

    def forward(
        self,
        x: torch.Tensor,
        g: torch.Tensor,
        f0: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
        fast: bool = True,
    ) -> torch.Tensor:
        """Latent [B, C, frames] (+ f0 [B, frames]) -> float32 waveform [B, 1, frames * upp]:
        :meth:`source`, then :meth:`decode`.

        Args:
            x: the latent, ``[B, C, frames]``
            g: the speaker embedding
            f0: the pitch in Hz, ``[B, frames]`` (None without pitch)
            generator: the random source of the NSF excitation
            dtype: the decoder's compute type
            fast: the channels-last tiled path (else the reference path)
        """
        return self.decode(x, g, self.source(f0, generator), dtype, fast)

    def source(self, f0: torch.Tensor | None, generator: torch.Generator | None = None) -> torch.Tensor | None:
        """The NSF excitation [B, 1, frames * upp] for ``f0`` [B, frames] (None without NSF), made
        for the whole chunk at once so the phase is continuous."""
        if self.m_source is None:
            return None
        assert f0 is not None, "an NSF decoder needs f0"
        return self.m_source(f0, self.upp, generator)

    def decode(
        self,
        x: torch.Tensor,
        g: torch.Tensor,
        source: torch.Tensor | None,
        dtype: torch.dtype = torch.float32,
        fast: bool = True,
        tiled: bool = True,
        layers: Layers | None = None,
        keep: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """Latent [B, C, frames] (+ excitation [B, 1, frames * upp]) -> float32 waveform
        [B, 1, frames * upp].

        ``fast`` runs the layers in the channels-last 2-D layout with weights and activations in
        ``dtype``, in tiles (below); otherwise the plain conv1d path runs on the whole chunk (the
        reference the fast path is tested against), under autocast when ``dtype`` is not float32.

        ``tiled`` (the CPU's way) runs in tiles of :func:`tile_frames` with :meth:`context_frames` of
        context either side (what reaches a frame: 10 for the standard 48 kHz decoder); a last tile
        keeps its frames rounded up to :data:`TILE_QUANTUM`, so tiles take a few shapes only: peak
        memory stays that of one tile, and the convolution kernels built for those shapes are
        reused for the whole song. A GPU takes the whole batch in one call instead.

        ``layers`` replaces the layers with another runtime's copy of them (the int8 decoder), in
        the same tiles; ``dtype`` and ``fast`` are then not used.

        ``keep`` (tiled only): the frames ``[first, end)`` whose audio is wanted; the tiles cover
        only those, each with its margin taken from the latent around it, and the audio elsewhere
        is zero. A chunk's half second of context either side is dropped by the engine, so its
        decode is not needed: a short chunk (between silences) then runs one tile fewer about
        half the time.

        Args:
            x: the latent, ``[B, C, frames]``
            g: the speaker embedding
            source: the NSF excitation, ``[B, 1, frames * upp]`` (None without pitch)
            dtype: the compute type
            fast: the channels-last tiled path (else the reference path)
            tiled: decode in tiles (the CPU's cache measure; a GPU runs untiled)
            layers: the layers to run (default: the decoder's own; the int8 decoder passes its own)
            keep: the output frames wanted, ``(first, end)`` (default: all)
        """
        frames = x.shape[-1]
        if layers is not None:
            fast = True
        tile = tile_frames(dtype, layers)
        first, end = (0, frames) if keep is None else (max(0, keep[0]), min(frames, keep[1]))
        if not fast or not tiled or (keep is None and frames <= tile + 2 * self.margin):
            return self._decode(x, g, source, dtype, fast, layers)
        pieces = [x.new_zeros(x.shape[0], 1, first * self.upp, dtype=torch.float32)]
        for start in range(first, end, tile):
            kept = min(tile, end - start)
            # a last tile keeps its frames rounded up to the quantum: few shapes, little work beyond the kept
            span = min(tile, -(-kept // TILE_QUANTUM) * TILE_QUANTUM) + 2 * self.margin
            lo = max(0, start - self.margin)
            hi = min(frames, lo + span)
            lo = max(0, hi - span)  # at the chunk's end a tile slides back rather than shrinking further
            tile_src = source[..., lo * self.upp : hi * self.upp] if source is not None else None
            y = self._decode(x[..., lo:hi], g, tile_src, dtype, fast, layers)
            pieces.append(y[..., (start - lo) * self.upp : (start - lo + kept) * self.upp])
        pieces.append(x.new_zeros(x.shape[0], 1, (frames - max(first, end)) * self.upp, dtype=torch.float32))
        return torch.cat(pieces, dim=-1)

    def _decode(
        self,
        x: torch.Tensor,
        g: torch.Tensor,
        source: torch.Tensor | None,
        dtype: torch.dtype,
        fast: bool,
        layers: Layers | None = None,
    ) -> torch.Tensor:
        if layers is not None:
            return layers(x.float(), g.float(), source.float() if source is not None else None)
        if fast:
            x, g = to_fast_layout(x, dtype), to_fast_layout(g, dtype)
            source = to_fast_layout(source, dtype) if source is not None else None
            return self._layers(x, g, source)[:, :, 0].float()
        with torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32):
            return self._layers(x, g, source).float()

    def _layers(self, x: torch.Tensor, g: torch.Tensor, source: torch.Tensor | None) -> torch.Tensor:
        return self.back(self.front(x, g, source, len(self.ups)), source, len(self.ups))

    def front(self, x: torch.Tensor, g: torch.Tensor, source: torch.Tensor | None, stages: int) -> torch.Tensor:
        """The layers up to the end of upsampling stage ``stages`` (its residual blocks included):
        the latent [B, C, T] -> [B, C / 2**stages, T * the first ``stages`` rates]. ``back`` goes on
        from there (the int8 decoder runs the front in int8 and the back in fp32).

        Args:
            x: the latent, ``[B, C, frames]``
            g: the speaker embedding
            source: the NSF excitation, ``[B, 1, frames * upp]`` (None without pitch)
            stages: how many upsampling stages to run
        """
        x = self.conv_pre(x)
        if self.cond is not None:
            x = x + self.cond(g)
        for i in range(stages):
            x = self._stage(i, x, source)
        return x

    def back(self, x: torch.Tensor, source: torch.Tensor | None, start: int) -> torch.Tensor:
        """The layers from upsampling stage ``start`` on, to the waveform [B, 1, T * upp]."""
        for i in range(start, len(self.ups)):
            x = self._stage(i, x, source)
        return torch.tanh(self.conv_post(F.leaky_relu(x)))

    def _stage(self, i: int, x: torch.Tensor, source: torch.Tensor | None) -> torch.Tensor:
        x = self.ups[i](F.leaky_relu(x, LRELU_SLOPE))
        if source is not None and self.noise_convs is not None:
            x = x + self.noise_convs[i](source)
        blocks = self.resblocks[i * self.num_kernels : (i + 1) * self.num_kernels]
        xs = blocks[0](x)
        for block in blocks[1:]:
            xs = xs + block(x)
        return xs / self.num_kernels
