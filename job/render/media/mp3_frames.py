"""MP3 (MPEG-1 Layer III) frames as bytes: cut a stream into frames, and write the gapless-playback
header frame (the Xing tag with LAME's extension) that tells a decoder how many frames there are
and how many samples of encoder delay and padding to drop.

Only what :mod:`job.render.media.stretch_encoder` needs to join streams our own encoder made: MPEG-1
Layer III without CRC or free-format bit rates, which is what LAME writes at 32, 44.1 and 48 kHz.
Layouts from the published formats (ISO/IEC 11172-3's frame header; the Xing tag and the LAME
tag, revision 1).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

SAMPLES_PER_FRAME = 1152  # MPEG-1 Layer III
ENCODER_DELAY = 576  # samples LAME puts before the first input sample (its ENCDELAY)
_BITRATES_KBPS = (0, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320)
_SAMPLE_RATES = (44100, 48000, 32000)
_INFO_BITRATE_INDEX = 9  # 128 kbps: room for the tags at every MPEG-1 rate
_TOC_ENTRIES = 100
_LAME_ENCODER = b"LAME3.100"  # decoders read the delay and padding only behind a "LAME" (or "Lav") tag


class FrameError(ValueError):
    """The bytes are not a stream of MPEG-1 Layer III frames."""


def frame_length(header: int) -> int:
    """The length in bytes of the frame whose 4-byte header is ``header``."""
    if header >> 21 != 0x7FF or (header >> 19) & 3 != 3 or (header >> 17) & 3 != 1:
        raise FrameError(f"not an MPEG-1 Layer III frame header: {header:08x}")
    bitrate, rate = (header >> 12) & 0xF, (header >> 10) & 3
    if bitrate in (0, 15) or rate == 3:
        raise FrameError(f"free-format or reserved frame header: {header:08x}")
    return 144_000 * _BITRATES_KBPS[bitrate] // _SAMPLE_RATES[rate] + ((header >> 9) & 1)


def split_frames(data: bytes) -> list[bytes]:
    """``data`` (frames and nothing else: no ID3 tag, no header frame) cut into its frames."""
    frames, at = [], 0
    while at < len(data):
        if len(data) - at < 4:
            raise FrameError(f"{len(data) - at} stray bytes after the last frame")
        length = frame_length(int.from_bytes(data[at : at + 4], "big"))
        if at + length > len(data):
            raise FrameError("the last frame is cut short")
        frames.append(data[at : at + length])
        at += length
    return frames


def crc16(data: bytes, crc: int = 0) -> int:
    """CRC-16 as the LAME tag uses it (polynomial 0x8005, bits reflected: 0xA001)."""
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
    return crc


def _info_header(first: bytes) -> int:
    """The header frame's 4-byte header: the stream's version, rate and channel mode, at a bit rate
    with room for the tags, without padding or CRC."""
    header = int.from_bytes(first[:4], "big")
    frame_length(header)  # checks it
    return (header & ~(0xF << 12) & ~(1 << 9)) | (_INFO_BITRATE_INDEX << 12) | (1 << 16)


def info_frame_length(first: bytes) -> int:
    """The length of :func:`info_frame`'s frame for a stream whose first frame is ``first``."""
    return frame_length(_info_header(first))


def info_frame(first: bytes, sizes: Sequence[int], samples: int) -> bytes:
    """The header frame for a stream of frames made by one LAME setting from ``samples`` samples.

    Args:
        first: the stream's first frame (its version, rate and channel mode are the header's)
        sizes: every frame's length in bytes, in order
        samples: how many samples per channel went in: the padding is what the frames hold beyond
            them and :data:`ENCODER_DELAY`
    """
    header = _info_header(first)
    frame = bytearray(frame_length(header))
    frame[:4] = header.to_bytes(4, "big")
    mono = (header >> 6) & 3 == 3
    at = 4 + (17 if mono else 32)  # after the (empty) side information
    padding = len(sizes) * SAMPLES_PER_FRAME - ENCODER_DELAY - samples
    if not 0 <= padding < 4096:
        raise FrameError(f"{len(sizes)} frames cannot hold {samples} samples after the encoder's delay")
    total = len(frame) + sum(sizes)
    starts = [len(frame)]
    for size in sizes[:-1]:
        starts.append(starts[-1] + size)
    # the seek table: where each hundredth of the duration starts, as a 256th of the file
    toc = bytes(min(255, 256 * starts[i * len(sizes) // _TOC_ENTRIES] // total) for i in range(_TOC_ENTRIES))
    frame[at : at + 16] = b"Xing" + struct.pack(">III", 0xF, len(sizes), total)  # frames, bytes, TOC, quality
    frame[at + 16 : at + 116] = toc
    lame = at + 120  # after the quality field (0)
    frame[lame : lame + 9] = _LAME_ENCODER
    frame[lame + 21 : lame + 24] = ((ENCODER_DELAY << 12) | padding).to_bytes(3, "big")
    frame[lame + 28 : lame + 32] = struct.pack(">I", total)  # music length; its CRC is left 0
    # the tag's own CRC covers the frame up to it (its first 190 bytes in stereo)
    frame[lame + 34 : lame + 36] = struct.pack(">H", crc16(bytes(frame[: lame + 34])))
    return bytes(frame)
