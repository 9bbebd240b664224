"""Autotune: the song's key heard in its instrumental (chroma against the Krumhansl-Kessler
profiles), and the sung notes snapped toward that key's notes by the asked strength."""

from __future__ import annotations

import numpy as np
import pytest

from job.render.music_key import MusicalKey, detect_key, key_of_melody, snap_to_key

RATE = 44100


def _hz(midi: float) -> float:
    return 440.0 * 2 ** ((midi - 69) / 12)


def _chords(progression: list[tuple[int, bool]], seconds: float = 2.0) -> np.ndarray:
    """Block chords (root, third, fifth, octave), each ``seconds`` long: (root MIDI note, minor?)."""
    t = np.arange(int(seconds * RATE)) / RATE
    out = []
    for root, minor in progression:
        intervals = (0, 3 if minor else 4, 7, 12)
        out.append(sum(np.sin(2 * np.pi * _hz(root + i) * t) for i in intervals) * 0.1)
    mono = np.concatenate(out).astype(np.float32)
    return np.stack([mono, mono])


@pytest.mark.parametrize(
    ("progression", "name"),
    [
        ([(50, False), (55, False), (57, False), (50, False)], "D major"),  # I IV V I
        ([(57, True), (50, True), (52, False), (57, True)], "A minor"),  # i iv V i
        ([(54, True), (59, True), (49, False), (54, True)], "F# minor"),
        ([(51, False), (56, False), (58, False), (51, False)], "D# major"),  # E flat, named by its sharp
    ],
)
def test_the_key_of_an_instrumental(progression, name):
    key = detect_key(_chords(progression), RATE)
    assert key is not None and key.name == name and key.confidence > 0.05


def test_silence_has_no_key():
    assert detect_key(np.zeros((2, RATE * 2), dtype=np.float32), RATE) is None


def test_notes_are_snapped_toward_the_key_by_the_strength():
    """A melody in A minor sung 30 cents sharp, with one note between two of the key's (a G#,
    closer to A than to G): strength 1 lands on the key's notes, 0.5 halfway in cents, 0 leaves
    it; unvoiced frames stay 0."""
    key = MusicalKey.parse("A minor")
    sung = np.array([57.3, 59.3, 60.3, 62.3, 64.3, 68.4, 0.0])  # A B C D E, G# (+0.4), silence
    f0 = np.array([_hz(m) if m else 0.0 for m in sung], dtype=np.float32)
    full = snap_to_key(f0, key, 1.0)
    midi = lambda f: 69 + 12 * np.log2(f / 440.0)  # noqa: E731
    assert np.allclose(midi(full[:6]), [57, 59, 60, 62, 64, 69], atol=0.01) and full[6] == 0
    half = snap_to_key(f0, key, 0.5)
    assert np.allclose(midi(half[:5]), sung[:5] - 0.15, atol=0.01)
    assert np.array_equal(snap_to_key(f0, key, 0.0), f0)


def test_the_key_names_the_option_takes():
    assert MusicalKey.parse("Eb major").pitch_classes().tolist() == [3, 5, 7, 8, 10, 0, 2]
    assert MusicalKey.parse("F# minor").name == "F# minor"
    melody = np.repeat([_hz(m) for m in (57, 59, 60, 62, 64, 65, 67, 69, 60, 64, 57)], 20)
    assert key_of_melody(melody).name in ("A minor", "C major")  # relative keys share their notes


def test_autotune_in_the_engine_moves_the_melody_the_decoder_is_given(converter, store):
    """A tone 40 cents sharp of A3, autotuned toward A minor: the excitation the engine hands the
    decoder (its sine source, read from the conversion's recorded priors: the demo voice's random
    decoder makes noise of it) sits on A3; without autotune it stays 40 cents sharp."""
    from shared.model_store import ModelStore
    from shared.options import ConversionOptions
    from tests.conftest import sung_tone

    voice = converter.load_voice(ModelStore(store).voice("demo-voice"))
    x = sung_tone(1.5, f0=_hz(57.4))
    heard = []
    for strength in (0.0, 1.0):
        priors: list = []
        options = ConversionOptions(f0_method="pm", autotune=strength, autotune_key="A minor", protect=0.5)
        converter.convert(x, 16000, voice, options, record=priors)
        source = np.concatenate([p[2].reshape(-1).float().cpu().numpy() for p in priors])
        middle = source[len(source) // 4 : 3 * len(source) // 4]
        middle = middle - middle.mean()
        size = 16 * len(middle)
        spectrum = np.abs(np.fft.rfft(middle * np.hanning(len(middle)), size))
        freqs = np.fft.rfftfreq(size, 1 / voice.sample_rate)
        band = (freqs > 150) & (freqs < 300)  # the fundamental's octave
        heard.append(float(freqs[band][np.argmax(spectrum[band])]))
    assert 69 + 12 * np.log2(heard[0] / 440) == pytest.approx(57.4, abs=0.1)
    assert 69 + 12 * np.log2(heard[1] / 440) == pytest.approx(57.0, abs=0.05)


def test_cover_make_autotunes_toward_the_key_it_hears_and_says_which(env, song, tmp_path):
    import json

    from tests.conftest import run_cover

    out = tmp_path / "tuned.wav"
    done = run_cover(["make", str(song), "--voice", "demo-voice", "-o", str(out), "--autotune", "0.8", "--json"], env)
    assert done.returncode == 0, done.stderr
    said = json.loads(done.stdout)["quality"]["song_key"]
    assert said and "heard in the instrumental" in said
    wrong = run_cover(["make", str(song), "--voice", "demo-voice", "-o", str(out), "--autotune-key", "H major"], env)
    assert wrong.returncode == 3 and "--autotune-key H major" in wrong.stderr


def test_a_named_key_is_used_as_asked_and_a_heard_one_is_named(tmp_path):
    from job.render.media.audio import write_wav
    from job.render.pipeline import CoverOptions, Pipeline
    from shared.options import ConversionOptions

    stem = write_wav(tmp_path / "no_vocals.wav", _chords([(50, False), (55, False), (57, False), (50, False)]), RATE)
    named = CoverOptions(conversion=ConversionOptions(autotune=1, autotune_key="G major"))
    assert Pipeline._settle_key(named, stem) == (named, "G major (as asked)")
    heard, said = Pipeline._settle_key(CoverOptions(conversion=ConversionOptions(autotune=1)), stem)
    assert heard.conversion.autotune_key == "D major" and said.startswith("D major (heard in the instrumental")
