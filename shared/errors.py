"""Stable error codes.

Every failure a user can cause or meet has a code here. The code is part of the contract: the
command line maps it to an exit status, the service puts it in ``cover.failed`` and in
``application/problem+json`` answers. Messages may change; codes may not.
"""

from __future__ import annotations

import errno
from enum import Enum


class ErrorCode(str, Enum):  # noqa: UP042 - str() of a member is its value, in messages
    INPUT_NOT_FOUND = "input.not_found"
    INPUT_NOT_AUDIO = "input.not_audio"
    INPUT_EMPTY = "input.empty"
    INPUT_NO_AUDIO_STREAM = "input.no_audio_stream"
    INPUT_TRUNCATED = "input.truncated"
    INPUT_SILENT = "input.silent"
    INPUT_TOO_LONG = "input.too_long"
    INPUT_TOO_SHORT = "input.too_short"
    INPUT_URL_REFUSED = "input.url_refused"
    INPUT_NO_VOCALS = "input.no_vocals"  # the separated vocals hold no singing: nothing to convert
    INPUT_DOWNLOAD_FAILED = "input.download_failed"
    VOICE_UNKNOWN = "voice.unknown"
    VOICE_NO_RIGHTS = "voice.no_rights"  # the deployment requires a rights record the voice lacks
    MODEL_MISSING = "model.missing"
    MODEL_CORRUPT = "model.corrupt"
    MODEL_UNSAFE = "model.unsafe"
    MODEL_MISMATCH = "model.mismatch"
    MODEL_HASH_MISMATCH = "model.hash_mismatch"
    OPTIONS_INVALID = "options.invalid"
    TOOL_MISSING = "tool.missing"
    WORK_NO_SPACE = "work.no_space"
    QUALITY_GATE = "quality.gate"
    # the platform, not our code, ended the request: answered by the `unanswered` function
    REQUEST_DEAD_LETTERED = "request.dead_lettered"  # Pub/Sub gave up delivering it
    JOB_EXECUTION_FAILED = "job.execution_failed"  # its Cloud Run execution failed without answering
    INTERNAL = "internal"


# Exit statuses of the command line (0 is success, 2 is argparse's usage error).
EXIT_BAD_INPUT = 3
EXIT_BAD_MODEL = 4
EXIT_INTERNAL = 5
EXIT_QUALITY_GATE = 6

_RETRYABLE = {
    ErrorCode.INPUT_DOWNLOAD_FAILED,
    ErrorCode.INTERNAL,
    ErrorCode.WORK_NO_SPACE,
    ErrorCode.REQUEST_DEAD_LETTERED,
    ErrorCode.JOB_EXECUTION_FAILED,
}

NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


class CoverError(Exception):
    """An error with a stable code, a human message and whether retrying can help."""

    def __init__(self, code: ErrorCode, message: str, *, retryable: bool | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retryable = code in _RETRYABLE if retryable is None else retryable

    @property
    def exit_status(self) -> int:
        if self.code.value.startswith(("input.", "voice.", "options.")):
            return EXIT_BAD_INPUT
        if self.code.value.startswith("model."):
            return EXIT_BAD_MODEL
        if self.code is ErrorCode.QUALITY_GATE:
            return EXIT_QUALITY_GATE
        return EXIT_INTERNAL

    def __str__(self) -> str:
        return f"{self.message} [{self.code.value}]"


NO_SPACE_WORDS = ("No space left on device", "Disk quota exceeded", "File too large")


def no_space(exc: BaseException) -> CoverError | None:
    """``work.no_space`` for a write the disk or a file-size limit refused (another attempt, on
    another machine, may have room), else None. Libraries that wrap the OS error (torch's writers,
    soundfile, numpy) are recognised by its words, through the chain of causes."""
    seen: BaseException | None = exc
    for _ in range(8):  # a chain of causes is short; never loop on a cycle
        if seen is None:
            break
        if isinstance(seen, OSError) and seen.errno in NO_SPACE_ERRNOS:
            return CoverError(ErrorCode.WORK_NO_SPACE, f"the work folder is out of space: {seen.strerror}")
        words = next((w for w in NO_SPACE_WORDS if w in str(seen)), None)
        if words is not None:
            return CoverError(ErrorCode.WORK_NO_SPACE, f"the work folder is out of space: {words}")
        seen = seen.__cause__ or seen.__context__
    return None


class QualityGateError(CoverError):
    """A cover whose scores stay below the gate: not published (``quality.gate``), the scores kept."""

    def __init__(self, message: str, report: object) -> None:
        super().__init__(ErrorCode.QUALITY_GATE, message, retryable=False)
        self.report = report
