"""The inaudible watermark: the second layer of a cover's provenance, which survives re-encoding and
cutting where the Content Credentials do not (they live in the file's metadata and bind its bytes).

**Design** (classical multiplicative spread spectrum in the STFT domain; no learned model). The
mix at 44.1 kHz is cut into frames of 2048 samples every 1024 (a periodic Hann window's square
root on analysis and on synthesis, so the frames overlap-add back to the signal). In the band
1.5 to 6 kHz (bins 70 to 277: where every codec we ship spends its bits, above the vocals'
fundamentals and below the hi-hats) the bins are grouped into 13 bands of 16 (345 Hz); a *tile* is
one band over two frames (46 ms). Each tile's spectrum is scaled by ``1 + a`` or ``1 - a``
(``a`` = :data:`STRENGTH`): the mark added is the music itself in that tile, ``a`` times as
loud (-16.5 dB in every tile: it sits where the music is and is silent where the music is, so
the music masks it). The signs repeat every packet of 128 frames (2.97 s): an eighth of a packet's
tiles carry a fixed pseudo-random *sync* pattern, the rest carry the 64 coded bits (a 48-bit id
and its CRC-16), each bit on about 23 tiles spread over the packet, each tile with its own
pseudo-random chip sign. The pattern is derived from a fixed seed (:data:`SEED`): it is the
scheme's, not a secret (this mark says "AI-generated, id X"; it is not meant to resist removal
by someone who knows the scheme).

**Reading** (:func:`detect`): any file decoded to 44.1 kHz mono (the mark is the same in both
channels). The log power of each (frame, band) is whitened (each frame's mean over the bands,
then each band's running mean over 17 frames, subtracted; outliers clipped) and weighted by the
inverse of its local variance (steady passages count more than transients), folded modulo the
packet, and correlated with the sync pattern at every packet offset and at four sub-frame shifts
(the reader does not know where an excerpt starts). The best offset's robust z-score (against the
median and spread of all 512 candidates, almost all of them the null) must reach
:data:`SYNC_THRESHOLD`, and the 64 bits read there must pass their CRC (or do so with one or two
of the least sure flipped): then the id is read. Every packet in the file adds to every bit, so
longer excerpts read more surely (10 s and more reliably).

The measured robustness, false positives and level are in docs/quality.md (``make bench-watermark``).

**Where it goes**: the mixer adds it to the mix before the gain and the limiter (both scale mark
and music alike), block by block: :class:`Marker` computes each block's mark from the frames that
touch it, on the song's global frame grid, so blocks join exactly. The id is the first 48 bits of
the manifest's label (``urn:c2pa:``), see :func:`shared.provenance.manifest_label`.
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from pydantic import BaseModel, Field
from scipy.ndimage import uniform_filter, uniform_filter1d

from shared.provenance import MARK_ID_BITS

RATE = 44_100  # the mix's rate; a reader resamples anything else to it
N_FFT = 2048
HOP = 1024
LOW_BIN, BANDS, BAND_BINS = 70, 13, 16  # bins 70 to 277 (1507 to 5965 Hz), 16 bins (345 Hz) a band
TILE_FRAMES = 2
PACKET_FRAMES = 128  # 2.97 s: a 20 s excerpt holds the packet six times
ID_BITS, CRC_BITS = MARK_ID_BITS, 16
CODED_BITS = ID_BITS + CRC_BITS
SYNC_SHARE = 0.125
STRENGTH = 0.15  # each tile scaled by 1 +- STRENGTH: the mark 16.5 dB under the music in every tile
SEED = b"melodia-cover watermark v1"
SYNC_THRESHOLD = 5.5  # the best offset's robust z-score (unmarked songs: at most 4.3, docs/quality.md)
CHASE_BITS = 8  # a failed CRC is retried with one or two of this many least sure bits flipped
SHIFTS = (0, HOP // 4, HOP // 2, 3 * HOP // 4)  # sub-frame starts the reader tries
WHITEN_FRAMES = 17  # each band's running mean over this many frames is taken out
WEIGHT_SPAN = (9, 3)  # frames and bands over which each cell's local variance is taken (its weight's inverse)
CLIP_SIGMA = 3.0


@dataclass(frozen=True)
class Layout:
    """Each (packet frame, band)'s role: ``sync`` the sync pattern's sign (0 off it), ``bit`` the
    coded bit it carries (-1 for sync), ``chip`` its pseudo-random sign."""

    sync: np.ndarray  # [PACKET_FRAMES, BANDS] in {-1, 0, 1}
    bit: np.ndarray  # [PACKET_FRAMES, BANDS] int
    chip: np.ndarray  # [PACKET_FRAMES, BANDS] in {-1, 1}


@lru_cache(maxsize=1)
def layout() -> Layout:
    rng = np.random.default_rng(int.from_bytes(hashlib.sha256(SEED).digest()[:8], "big"))
    tiles = (PACKET_FRAMES // TILE_FRAMES) * BANDS
    order = rng.permutation(tiles)
    n_sync = int(tiles * SYNC_SHARE)
    bit = np.empty(tiles, np.int64)
    bit[order[:n_sync]] = -1
    bit[order[n_sync:]] = np.arange(tiles - n_sync) % CODED_BITS
    chip = rng.choice(np.array([-1, 1]), tiles)
    sync = np.where(bit < 0, chip, 0)

    def per_frame(tile_values: np.ndarray) -> np.ndarray:
        return np.repeat(tile_values.reshape(PACKET_FRAMES // TILE_FRAMES, BANDS), TILE_FRAMES, axis=0)

    return Layout(sync=per_frame(sync), bit=per_frame(bit), chip=per_frame(chip))


# --- the payload ---------------------------------------------------------------------------------
def crc16(data: bytes) -> int:
    """CRC-16/CCITT-FALSE (polynomial 0x1021, initial 0xFFFF)."""
    crc = 0xFFFF
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
            crc &= 0xFFFF
    return crc


def encode(mark_id: int) -> np.ndarray:
    """The 64 coded bits of a 48-bit id (its bits, then its CRC-16's), as signs (+1 for a 1)."""
    if not 0 <= mark_id < 1 << ID_BITS:
        raise ValueError(f"a watermark id has {ID_BITS} bits")
    word = (mark_id << CRC_BITS) | crc16(mark_id.to_bytes(ID_BITS // 8, "big"))
    return np.array([1 if word >> (CODED_BITS - 1 - i) & 1 else -1 for i in range(CODED_BITS)])


def decode(signs: np.ndarray) -> int | None:
    """The id the coded bits carry, or None where their CRC does not match."""
    word = 0
    for s in signs:
        word = (word << 1) | int(s > 0)
    mark_id, crc = word >> CRC_BITS, word & ((1 << CRC_BITS) - 1)
    return mark_id if crc16(mark_id.to_bytes(ID_BITS // 8, "big")) == crc else None


def mark_id_for(*facts: str) -> int:
    """A cover's watermark id from what makes it (the song's audio hash, the voices, the options):
    the same request renders the same audio, mark included."""
    return int.from_bytes(hashlib.sha256("\n".join(facts).encode()).digest()[: ID_BITS // 8], "big")


# --- embedding -----------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def _window() -> np.ndarray:
    return np.sqrt(0.5 - 0.5 * np.cos(2 * np.pi * np.arange(N_FFT) / N_FFT)).astype(np.float32)


def gains(mark_id: int) -> np.ndarray:
    """Each packet frame's per-bin scale minus one, ``[PACKET_FRAMES, N_FFT // 2 + 1]``: +-STRENGTH
    in the band, 0 elsewhere."""
    plan = layout()
    bits = encode(mark_id)
    signs = np.where(plan.bit < 0, plan.sync, plan.chip * bits[np.maximum(plan.bit, 0)])
    out = np.zeros((PACKET_FRAMES, N_FFT // 2 + 1), np.float32)
    out[:, LOW_BIN : LOW_BIN + BANDS * BAND_BINS] = STRENGTH * np.repeat(signs, BAND_BINS, axis=1)
    return out


class Marker:
    """The watermark of one id, made a block at a time on the song's global frame grid.

    Args:
        mark_id: the 48-bit id it carries
    """

    context = N_FFT  # samples of the host needed on each side of a block

    def __init__(self, mark_id: int) -> None:
        self.mark_id = mark_id
        self.gains = gains(mark_id)

    def mark(self, host: np.ndarray, host_start: int, start: int, end: int) -> np.ndarray:
        """The mark on samples ``start:end`` of the song (mono float32), from ``host``: the mix's
        mono samples from ``host_start`` on, covering ``start - context`` to ``end + context``
        where the song has them (zeros are assumed beyond)."""
        first = max(0, -(-(start - N_FFT + 1) // HOP))  # frames that touch start:end
        last = (end - 1) // HOP
        out = np.zeros(end - start, np.float32)
        if last < first:
            return out
        lo = first * HOP  # the frames' span in the song
        span = np.zeros((last - first) * HOP + N_FFT, np.float32)
        a, b = max(lo, host_start), min(lo + span.size, host_start + host.size)
        if b > a:
            span[a - lo : b - lo] = host[a - host_start : b - host_start]
        window = _window()
        frames = np.lib.stride_tricks.sliding_window_view(span, N_FFT)[::HOP] * window
        spectra = np.fft.rfft(frames, axis=-1)
        spectra *= self.gains[np.arange(first, last + 1) % PACKET_FRAMES]
        pieces = np.fft.irfft(spectra, n=N_FFT, axis=-1).astype(np.float32) * window
        added = np.zeros(span.size, np.float32)
        for i, piece in enumerate(pieces):  # overlap-add (two frames per sample)
            added[i * HOP : i * HOP + N_FFT] += piece
        return added[start - lo : end - lo]


def _chase(soft: np.ndarray) -> int | None:
    """The id the soft bits carry: their signs, or failing the CRC, the signs with one or two of the
    :data:`CHASE_BITS` least sure flipped (37 candidates: a random word passes one with odds of
    37 in 65 536, and only after the sync pattern stood out)."""
    weakest = np.argsort(np.abs(soft))[:CHASE_BITS]
    for flips in [(), *((i,) for i in weakest), *itertools.combinations(weakest, 2)]:
        signs = np.sign(soft)
        signs[list(flips)] *= -1
        found = decode(signs)
        if found is not None:
            return found
    return None


# --- reading -------------------------------------------------------------------------------------
class Detection(BaseModel):
    """What :func:`detect` found."""

    found: bool = Field(description="A mark was read: its sync pattern stands out and its CRC matches.")
    mark_id: int | None = Field(None, description="The 48-bit id it carries.")
    sync_z: float = Field(description="The sync pattern's robust z-score at the best offset.")
    bit_margin: float = Field(0.0, description="The weakest bit's |soft value| over the bits' spread.")
    seconds: float = Field(description="How much audio was read.")

    @property
    def hex_id(self) -> str | None:
        return None if self.mark_id is None else f"{self.mark_id:012x}"


def _features(mono: np.ndarray) -> np.ndarray:
    """Whitened log band powers ``[frames, BANDS]`` of a 44.1 kHz mono signal."""
    frames = np.lib.stride_tricks.sliding_window_view(mono, N_FFT)[::HOP]
    window = _window()
    hi = LOW_BIN + BANDS * BAND_BINS
    out = np.empty((frames.shape[0], BANDS), np.float32)
    for i in range(0, frames.shape[0], 512):  # bounded memory on long files
        spectra = np.fft.rfft(frames[i : i + 512] * window, axis=-1)[:, LOW_BIN:hi]
        power = (spectra.real**2 + spectra.imag**2).reshape(-1, BANDS, BAND_BINS).sum(axis=-1)
        out[i : i + 512] = np.log(power + 1e-12)
    out -= out.mean(axis=1, keepdims=True)
    out -= uniform_filter1d(out, WHITEN_FRAMES, axis=0, mode="nearest")
    spread = float(out.std()) or 1.0
    np.clip(out, -CLIP_SIGMA * spread, CLIP_SIGMA * spread, out=out)
    return out / (uniform_filter(out**2, size=WEIGHT_SPAN, mode="nearest") + 1e-3 * spread**2)


def detect(mono: np.ndarray) -> Detection:
    """Read the watermark in ``mono`` (44.1 kHz, float)."""
    mono = np.asarray(mono, np.float32)
    seconds = mono.size / RATE
    if mono.size < N_FFT + max(SHIFTS) + HOP * 8:
        return Detection(found=False, sync_z=0.0, seconds=seconds)
    plan = layout()
    # every (shift, offset) candidate's sync score, and each shift's packet fold
    folds, scores = [], []
    rolled_sync = np.stack([np.roll(plan.sync, -o, axis=0) for o in range(PACKET_FRAMES)])
    for shift in SHIFTS:
        u = _features(mono[shift:])
        fold = np.zeros((PACKET_FRAMES, BANDS), np.float32)
        whole = u.shape[0] // PACKET_FRAMES * PACKET_FRAMES
        fold += u[:whole].reshape(-1, PACKET_FRAMES, BANDS).sum(axis=0)
        fold[: u.shape[0] - whole] += u[whole:]
        folds.append(fold)
        scores.append(np.einsum("pb,opb->o", fold, rolled_sync))
    grid = np.stack(scores)  # [shifts, offsets]
    median = float(np.median(grid))
    spread = 1.4826 * float(np.median(np.abs(grid - median))) or 1.0
    s, o = np.unravel_index(int(np.argmax(grid)), grid.shape)
    z = (float(grid[s, o]) - median) / spread
    if z < SYNC_THRESHOLD:
        return Detection(found=False, sync_z=z, seconds=seconds)
    aligned = np.roll(folds[s], o, axis=0)  # packet frame q holds fold[(q - o) mod PACKET_FRAMES]
    soft = np.zeros(CODED_BITS)
    np.add.at(soft, plan.bit[plan.bit >= 0], (aligned * plan.chip)[plan.bit >= 0])
    mark_id = _chase(soft)
    margin = float(np.abs(soft).min() / (soft.std() or 1.0))
    return Detection(found=mark_id is not None, mark_id=mark_id, sync_z=z, bit_margin=margin, seconds=seconds)
