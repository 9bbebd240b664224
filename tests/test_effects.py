"""The vocals' effect chain, judged by measures rather than by ear: the reverb's impulse response and
its RT60 (Schroeder backward integration), the compressor's static curve, the high-pass corner,
and the mix's loudness and true peak with the chain on."""

from __future__ import annotations

import numpy as np
import pytest

from job.render.media.audio import read_wav, write_wav
from job.render.mix.effects import PRESETS, EffectChain, apply_effects, chain_for
from shared.options import EffectsPreset, MixOptions

RATE = 48000


def _through(chain: EffectChain, audio: np.ndarray, tmp_path, name: str = "x") -> np.ndarray:
    source = write_wav(tmp_path / f"{name}.wav", audio[None].astype(np.float32), RATE)
    out, rate = read_wav(apply_effects(source, chain, tmp_path / f"{name}.fx.wav"))
    assert rate == RATE and out.shape == (1, len(audio))  # same rate, same length to the sample
    return out[0]


def _rt60(response: np.ndarray) -> float:
    """Schroeder's backward-integrated energy decay, its slope fitted from -5 to -25 dB (T20)."""
    energy = np.cumsum(response[::-1] ** 2)[::-1]
    decay = 10 * np.log10(np.maximum(energy / energy[0], 1e-30))
    t = np.arange(len(decay)) / RATE
    fit = (decay < -5) & (decay > -25)
    return float(-60 / np.polyfit(t[fit], decay[fit], 1)[0])


@pytest.mark.parametrize("preset", [EffectsPreset.NATURAL, EffectsPreset.STUDIO, EffectsPreset.HALL])
def test_each_preset_s_reverb_has_its_reverb_time_and_keeps_the_dry_voice(tmp_path, preset):
    reverb = PRESETS[preset].model_copy(
        update={"highpass_hz": 0, "compressor_ratio": 1, "deesser": False, "presence_db": 0}
    )
    impulse = np.zeros(int(RATE * (1 + 1.5 * reverb.reverb_s)))
    impulse[RATE // 2] = 0.5
    response = _through(reverb, impulse, tmp_path)[RATE // 2 :]
    assert response[0] == pytest.approx(0.5, abs=1e-3)  # the dry voice, untouched
    assert np.all(np.abs(response[1 : int(0.019 * RATE)]) < 1e-4)  # the pre-delay: silence
    tail = response[int(0.02 * RATE) :]
    assert _rt60(tail) == pytest.approx(reverb.reverb_s, rel=0.08)
    wet = np.sqrt(np.sum(tail**2)) / 0.5
    assert wet == pytest.approx(reverb.reverb_wet, rel=0.05)  # its energy against the dry impulse's


def test_the_compressor_s_static_curve_has_the_slope_of_its_ratio(tmp_path):
    """Steady 1 kHz tones from -40 to -4 dBFS through the compressor alone: below the threshold the
    level passes as it is; well above, each dB in gives 1/ratio dB out."""
    chain = EffectChain(compressor_threshold_db=-24, compressor_ratio=4)
    t = np.arange(RATE) / RATE
    levels_in, levels_out = [-40, -36, -12, -8, -4], []
    for i, level in enumerate(levels_in):
        tone = 10 ** (level / 20) * np.sqrt(2) * np.sin(2 * np.pi * 1000 * t)  # RMS at `level`
        out = _through(chain, tone, tmp_path, f"tone{i}")[RATE // 2 :]  # past the attack
        levels_out.append(20 * np.log10(np.sqrt(np.mean(out**2))))
    assert levels_out[1] - levels_out[0] == pytest.approx(4.0, abs=0.2)  # below: 1:1
    assert levels_out[4] - levels_out[2] == pytest.approx(8 / 4, abs=0.3)  # above: 1:4
    assert levels_out[0] == pytest.approx(-40, abs=0.5)


def test_the_high_pass_keeps_the_voice_and_cuts_the_rumble(tmp_path):
    chain = EffectChain(highpass_hz=100)
    t = np.arange(RATE) / RATE
    gains = {}
    for hz in (30, 100, 1000):
        out = _through(chain, 0.3 * np.sin(2 * np.pi * hz * t), tmp_path, f"hp{hz}")[RATE // 4 :]
        gains[hz] = 20 * np.log10(np.sqrt(np.mean(out**2)) / (0.3 / np.sqrt(2)))
    assert gains[1000] == pytest.approx(0, abs=0.2) and gains[100] == pytest.approx(-3, abs=0.5)
    assert gains[30] < -18  # two poles: 12 dB per octave below the corner


def test_presets_and_overrides_and_none_does_nothing(tmp_path):
    assert chain_for(MixOptions()).reverb_s == 0.8  # natural by default
    hall = chain_for(MixOptions(effects="hall", reverb_wet=0.5, deesser=True))
    assert (hall.reverb_s, hall.reverb_wet, hall.deesser) == (2.5, 0.5, True)
    source = write_wav(tmp_path / "v.wav", np.zeros((1, 100), dtype=np.float32), RATE)
    assert apply_effects(source, chain_for(MixOptions(effects="none")), tmp_path / "unused.wav") == source


def test_the_mix_keeps_its_loudness_and_peak_targets_with_effects_on(tmp_path):
    from job.devkit import demo
    from job.render.media.audio import MIX_SAMPLE_RATE
    from job.render.mix.mixer import mix

    vocals, inst = demo.demo_song(8.0)
    v = write_wav(tmp_path / "vocals.wav", vocals.mean(axis=0, keepdims=True), MIX_SAMPLE_RATE)
    i = write_wav(tmp_path / "inst.wav", inst, MIX_SAMPLE_RATE)
    for preset in ("studio", "hall"):
        options = MixOptions(effects=preset)
        wet = apply_effects(v, chain_for(options), tmp_path / f"vocals.{preset}.wav")
        result = mix(i, wet, tmp_path / f"cover.{preset}.mp3", options)
        assert result.loudness_lufs == pytest.approx(-14.0, abs=0.5) and result.true_peak_dbtp <= -1.0 + 0.05


def test_a_cover_says_what_made_it(env, song, tmp_path):
    """One cover with a key change and the hall preset (its wet level overridden): the answer's
    shift and length, and the report (and the --json answer) naming the tracker, the shifts and the
    effect chain."""
    import json

    from tests.conftest import run_cover

    out = tmp_path / "cover.mp3"
    args = ["make", str(song), "--voice", "demo-voice", "-o", str(out), "--json", "--report", "--key-shift", "2"]
    done = run_cover([*args, "--effects", "hall", "--reverb-wet", "0.2", "--f0-method", "pm"], env)
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer["pitch_shift"] == 2 and answer["duration_s"] == pytest.approx(6.0, abs=0.05)
    made = answer["quality"]["made_with"]
    assert made[:3] == ["pitch tracker pm", "vocals shifted +2 semitones", "song moved +2 semitones (key change)"]
    assert made[-1].startswith("effects hall: high-pass 80 Hz") and "reverb 2.5 s at 0.2" in made[-1]
    page = (tmp_path / "cover.report.html").read_text()
    assert "Made with: pitch tracker pm; vocals shifted +2 semitones; song moved +2 semitones" in page
