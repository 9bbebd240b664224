"""Notes as people name them: ``A3``, ``Eb4``, ``F#2``; MIDI numbers (A4 = 440 Hz = 69). Shared by
the stages that speak of notes (the pitch trackers, the report page, the song's key)."""

from __future__ import annotations

import math

NOTE_NAMES = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")


def hz_to_midi(hz: float) -> float:
    """The MIDI note number of ``hz`` (A4 = 440 Hz = 69), fractional."""
    return 69 + 12 * math.log2(hz / 440.0)


def midi_note(midi: float) -> str:
    """The name of the nearest MIDI note, e.g. ``A3`` for 57."""
    rounded = round(midi)
    return f"{NOTE_NAMES[rounded % 12]}{rounded // 12 - 1}"


def note_name(hz: float) -> str:
    """The nearest equal-tempered note (A4 = 440 Hz), e.g. ``A3``."""
    return midi_note(hz_to_midi(hz))


ACCIDENTALS = {"": 0, "#": 1, "b": -1}


def _semitones_from_c(name: str) -> int:
    """``"C"`` 0 ... ``"B"`` 11, ``#`` or ``b`` after the letter moving it (``"Cb"`` -1, ``"B#"`` 12)."""
    if not name or name[0] not in NOTE_NAMES or name[1:] not in ACCIDENTALS:
        raise ValueError(f"{name!r} is not a note name such as G, Eb or F#")
    return NOTE_NAMES.index(name[0]) + ACCIDENTALS[name[1:]]


def pitch_class(name: str) -> int:
    """A note name's pitch class, 0 (C) to 11 (B): ``"Eb"`` 3, ``"F#"`` 6."""
    return _semitones_from_c(name) % 12


def parse_pitch(text: str) -> float:
    """A pitch as people write it: Hz (``"196"``, ``"196.0"``) or a note (``"G3"``, ``"Eb4"``, ``"F#2"``)."""
    try:
        return float(text)
    except ValueError:
        pass
    name, octave = text[:-1], text[-1:]
    try:
        semitones = _semitones_from_c(name)
    except ValueError:
        octave = ""
    if not octave.isdigit():
        raise ValueError(f"{text!r} is neither Hz nor a note such as G3, Eb4 or F#2")
    return 440.0 * 2 ** ((12 * (int(octave) + 1) + semitones - 69) / 12)
