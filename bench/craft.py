"""The cover craft's costs: each pitch tracker (seconds per minute of vocals) and each vocal effect
preset (seconds per minute of 48 kHz vocals): ``python -m bench.craft [--seconds 60]``.

Trackers run through the engine's own entry (``VoiceConverter.hear_pitch``) on the demo song's
vocals at 16 kHz, once to load, then timed; RMVPE on the store's model (random weights run as fast
as real ones), FCPE on its real weights when the store holds ``base/fcpe.pt`` (else out of
torchfcpe's wheel in ``build/wheels``), CREPE on the weights its wheel ships. Prints Markdown rows."""

from __future__ import annotations

import argparse
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TRACKERS = ("rmvpe", "fcpe", "crepe", "crepe-tiny", "harvest", "pm", "rmvpe+fcpe")


def _fcpe_in(store: Path) -> None:
    target = store / "base" / "fcpe.pt"
    wheel = ROOT / "build/wheels/torchfcpe-0.0.4-py3-none-any.whl"
    if not target.is_file() and wheel.is_file():
        with zipfile.ZipFile(wheel) as archive:
            target.write_bytes(archive.read("torchfcpe/assets/fcpe_c_v001.pt"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    args = parser.parse_args()
    from job.devkit import demo
    from job.render.media.audio import to_16k, write_wav
    from job.render.mix.effects import PRESETS, apply_effects
    from job.render.rvc.engine import VoiceConverter
    from shared.model_store import ModelStore
    from shared.options import EffectsPreset
    from shared.settings import Settings

    store = Settings().models_dir
    demo.write_models(store)
    _fcpe_in(store)
    vocals = demo.demo_song(args.seconds)[0]
    x = to_16k(vocals, 44100).astype(np.float32)
    x = x[0] if x.ndim == 2 else x
    converter = VoiceConverter(ModelStore(store), device="cpu")
    per_minute = 60.0 / args.seconds
    print(f"| pitch tracker | s per minute of vocals ({args.seconds:.0f} s timed) |\n| --- | --- |")
    for method in TRACKERS:
        converter.hear_pitch(x[:16000], method)  # loads the model
        started = time.perf_counter()
        converter.hear_pitch(x, method)
        print(f"| {method} | {(time.perf_counter() - started) * per_minute:.2f} |")
    with tempfile.TemporaryDirectory() as tmp:
        wav = write_wav(Path(tmp) / "vocals.wav", (0.3 * vocals.mean(axis=0))[None], 48000)
        print("\n| effects preset | s per minute of 48 kHz vocals |\n| --- | --- |")
        for preset in EffectsPreset:
            started = time.perf_counter()
            apply_effects(wav, PRESETS[preset], Path(tmp) / f"{preset.value}.wav")
            print(f"| {preset.value} | {(time.perf_counter() - started) * per_minute:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
