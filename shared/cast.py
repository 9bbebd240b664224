"""Who sings what: a cover's further voices (duets, unison) beside its main voice, as a request
names them. The main voice (``voice_model``) sings every part of the lead that no further voice
is given; a range given to several voices is sung by all of them at once (unison).

Pure data, shared by the API, the events, the command line and the job (which plans the cuts:
``job/render/duet.py``).
"""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field, model_validator

from shared.names import VOICE_NAME_PATTERN
from shared.options import ConversionOptions

MAX_VOICES = 8  # further voices in one request
MAX_RANGES = 64  # ranges per voice
_CLI_VOICE = re.compile(r"^(?P<name>[^@]+)(@(?P<ranges>.+))?$")


class TimeRange(BaseModel):
    """Seconds of the song, ``from`` to ``to``."""

    model_config = ConfigDict(populate_by_name=True, serialize_by_alias=True, extra="forbid")

    start_s: float = Field(alias="from", ge=0, le=24 * 3600, description="Start, seconds from the song's start.")
    end_s: float = Field(alias="to", gt=0, le=24 * 3600, description="End, seconds (after from).")

    @model_validator(mode="after")
    def _ordered(self) -> TimeRange:
        if self.end_s <= self.start_s:
            raise ValueError(f"a range ends after it starts: from {self.start_s:g} to {self.end_s:g}")
        return self


class VoicePart(BaseModel):
    """A further voice and the stretches of the lead it sings."""

    model_config = ConfigDict(extra="forbid")

    voice_model: str = Field(pattern=VOICE_NAME_PATTERN, description="A voice name, as GET /models lists them.")
    ranges: list[TimeRange] = Field(min_length=1, max_length=MAX_RANGES, description="What it sings, in seconds.")
    options: ConversionOptions | None = Field(
        None,
        description="Its own conversion options (pitch, index_rate, ...); unset: the request's. key_shift is the "
        "request's for every voice (one instrumental); 'auto-fit' is the main voice's alone (it moves the key).",
    )

    @model_validator(mode="after")
    def _no_own_key(self) -> VoicePart:
        if self.options is not None and self.options.pitch == "auto-fit":
            raise ValueError(
                "'auto-fit' moves the whole song's key: a further voice takes a number of semitones or 'auto'"
            )
        return self


def parse_cli_voices(values: list[str]) -> tuple[str, list[VoicePart]]:
    """``--voice a --voice b@32.5-61,70-80`` -> ("a", [b over 32.5-61 and 70-80]): the one voice named
    without ranges is the main voice. ``ValueError`` in the flag's words otherwise."""
    main: list[str] = []
    parts: dict[str, list[TimeRange]] = {}
    for value in values:
        match = _CLI_VOICE.match(value.strip())
        if match is None:
            raise ValueError(f"--voice {value!r}: expected NAME or NAME@FROM-TO[,FROM-TO...]")
        name, ranges = match["name"].strip(), match["ranges"]
        if ranges is None:
            main.append(name)
            continue
        for text in ranges.split(","):
            start, sep, end = text.strip().partition("-")
            try:
                parts.setdefault(name, []).append(TimeRange(start_s=float(start), end_s=float(end or "nan")))
            except ValueError as exc:
                raise ValueError(f"--voice {value!r}: {text!r} is not FROM-TO in seconds ({exc})") from None
            if not sep:
                raise ValueError(f"--voice {value!r}: {text!r} is not FROM-TO in seconds")
    if len(main) != 1:
        raise ValueError(
            "name the main voice once without a range (it sings everything not given to another voice): "
            f"got {len(main)} ({', '.join(main) or 'none'})"
        )
    return main[0], [VoicePart(voice_model=name, ranges=ranges) for name, ranges in parts.items()]
