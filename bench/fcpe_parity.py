"""FCPE parity: our inference (job/render/rvc/fcpe.py) against torchfcpe 0.0.4's own, on test tones
and the demo song's vocals; writes the reference's tracks as the suite's expected values
(tests/data/fcpe_reference.json). Not part of the suite: the reference runs from torchfcpe's wheel
in this separate process, with the two modules it imports but never calls on this path stubbed
(torchaudio's Resample: 16 kHz input is not resampled; local_attention: the checkpoint is
conv-only). ``make bench-fcpe-parity`` (downloads torchfcpe's and einops' wheels, no install).

Measured (2026-12-05, AMD EPYC AVX2): every voiced frame within 0.0000 cents, voicing identical on
100 % of frames, on 110, 220, 440 and 587 Hz tones and 20 s of the demo vocals.
"""

from __future__ import annotations

import argparse
import json
import sys
import types
import zipfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def tone(hz: float, seconds: float = 2.0, rate: int = 16000) -> np.ndarray:
    """A sung-like tone: five harmonics, 1 % vibrato at 5 Hz."""
    t = np.arange(int(seconds * rate)) / rate
    phase = 2 * np.pi * np.cumsum(hz * (1 + 0.01 * np.sin(2 * np.pi * 5 * t))) / rate
    x = sum(np.sin(h * phase) / h for h in range(1, 6))
    return (0.3 * x / np.max(np.abs(x))).astype(np.float32)


def demo_vocals(seconds: float) -> np.ndarray:
    from job.devkit import demo
    from job.render.media.audio import to_16k

    vocals = to_16k(demo.demo_song(seconds)[0], 44100).astype(np.float32)
    vocals = vocals[0] if vocals.ndim == 2 else vocals
    return vocals / max(1.0, float(np.abs(vocals).max()))


def reference(wheels: Path) -> object:
    unpacked = wheels / "unpacked"
    for wheel in wheels.glob("*.whl"):
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(unpacked)
    sys.path.insert(0, str(unpacked))
    stub = types.ModuleType("torchaudio")
    stub.transforms = types.ModuleType("torchaudio.transforms")  # type: ignore[attr-defined]
    stub.transforms.Resample = object
    attention = types.ModuleType("local_attention")
    attention.LocalAttention = object  # type: ignore[attr-defined]
    sys.modules.update({"torchaudio": stub, "torchaudio.transforms": stub.transforms, "local_attention": attention})
    from torchfcpe.models_infer import spawn_infer_model_from_pt  # type: ignore[import-not-found]

    return spawn_infer_model_from_pt(str(unpacked / "torchfcpe/assets/fcpe_c_v001.pt"), device="cpu")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wheels", type=Path, default=ROOT / "build/wheels", help="torchfcpe's and einops' wheels")
    parser.add_argument("--write", type=Path, default=ROOT / "tests/data/fcpe_reference.json")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from job.render.rvc.fcpe import FCPE

    ref = reference(args.wheels)
    ours = FCPE.load(args.wheels / "unpacked/torchfcpe/assets/fcpe_c_v001.pt")
    inputs = {f"tone {hz} Hz": tone(hz) for hz in (110, 220, 440, 587)}
    inputs["demo vocals"] = demo_vocals(20.0)
    stored = {}
    for name, x in inputs.items():
        wav = torch.from_numpy(x)[None, :, None]
        theirs = ref.infer(wav, sr=16000, decoder_mode="local_argmax", threshold=0.006, interp_uv=False)  # type: ignore[attr-defined]
        r, o = theirs[0, :, 0].numpy(), ours.f0(x)
        both = (r > 0) & (o > 0)
        cents = np.abs(1200 * np.log2(o[both] / r[both])) if both.any() else np.zeros(1)
        print(
            f"{name:14s} frames {len(o)} / {len(r)}, voicing agrees {np.mean((r > 0) == (o > 0)):.4f}, "
            f"largest difference {cents.max():.4f} cents over {both.sum()} voiced frames"
        )
        stored[name] = [round(float(v), 3) for v in r[:800]]  # the first 8 s
    args.write.write_text(json.dumps({"threshold": 0.006, "hop_s": 0.01, "f0_hz": stored}, indent=0) + "\n")
    print(f"expected values: {args.write}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
