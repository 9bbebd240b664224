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


def parse_pitch(text: str) -> float:
    """A pitch as people write it: Hz (``"196"``, ``"196.0"``) or a note (``"G3"``, ``"Eb4"``, ``"F#2"``)."""
    try:
        return float(text)
    except ValueError:
        pass
    name, octave = text[:-1], text[-1:]
    if not octave.isdigit() or not name or name[0] not in NOTE_NAMES or name[1:] not in ("", "#", "b"):
        raise ValueError(f"{text!r} is neither Hz nor a note such as G3, Eb4 or F#2")
    pitch_class = NOTE_NAMES.index(name[0]) + {"": 0, "#": 1, "b": -1}[name[1:]]
    return 440.0 * 2 ** ((12 * (int(octave) + 1) + pitch_class - 69) / 12)
