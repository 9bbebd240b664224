"""Identifiers from outside, in one canonical form, and file names reduced to safe base names.

* a song id is one or more ``/``-separated segments, each starting with a letter or digit and made
  of letters, digits, ``.``, ``_`` and ``-`` (so no empty segment, no ``.`` or ``..``, no leading or
  trailing slash, no backslash): it cannot name an object outside ``songs/``, and one song has one
  spelling;
* a voice name is a lower-case slug (:data:`VOICE_NAME_PATTERN`);
* any file name that comes from outside (zip entries, ``voice.json``, URLs) goes through
  :func:`safe_file_name` before anything is written: a base name inside its folder.
"""

from __future__ import annotations

import re
import unicodedata

SEGMENT = r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}"
SONG_ID_PATTERN = rf"^{SEGMENT}(/{SEGMENT})*$"  # RE2-compatible (no look-around), for Go consumers too
SONG_ID_MAX_LENGTH = 200
VOICE_NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"
FILE_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"


def safe_file_name(name: str, default: str = "file") -> str:
    """The last component of ``name`` (either slash), without control characters, with anything
    but letters, digits, ``.``, ``_`` and ``-`` replaced and leading dots removed; ``default`` when
    nothing is left."""
    base = re.split(r"[/\\]", name)[-1]
    base = unicodedata.normalize("NFKC", base)
    base = re.sub(r"[^A-Za-z0-9._-]+", "-", base).lstrip(".-_")[:100]
    return base if re.match(FILE_NAME_PATTERN, base) else default


REQUEST_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"  # a request id: up to 128 plain characters


def printable(text: str) -> str:
    """``text`` without control characters (terminal escapes), for printing data from outside."""
    return "".join(ch for ch in text if unicodedata.category(ch)[0] != "C" or ch == " ")
