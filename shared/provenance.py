"""What a cover's Content Credentials say, and the check of them (c2pa-python): shared by the job,
the command line (``cover verify``), the events and the API (``GET /covers/{id}/provenance``).
The signing is ``job/render/credentials.py``'s."""

from __future__ import annotations

import base64
import uuid
from enum import Enum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

AI_SOURCE_TYPE = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
COVER_ASSERTION = "org.melodia.cover"  # our assertion: voices with their rights, the song, the verdict
DEVELOPMENT_SIGNER = "melodia-cover development signature"  # the local key's organisation: never trusted in production
WATERMARK_ALGORITHM = "org.melodia.watermark.ss.1"  # the soft-binding assertion's algorithm: our watermark
SOFT_BINDING = "c2pa.soft-binding"
MARK_ID_BITS = 48  # the watermark's id: the first 48 bits of its manifest's UUID


def manifest_label(mark_id: int, tail: int) -> str:
    """A C2PA manifest label whose UUID begins with the watermark's id: a version-4 UUID (the
    form c2pa accepts) whose first 48 bits are the id (a hash, as unpredictable as random bits)
    and whose other 74 free bits are ``tail`` (random)."""
    value = (mark_id << 80) | (0x4 << 76) | ((tail >> 62) & 0xFFF) << 64 | (0b10 << 62) | (tail & ((1 << 62) - 1))
    return f"urn:c2pa:{uuid.UUID(int=value)}"


def mark_id_of(label: str) -> int:
    """The watermark id a manifest label carries (:func:`manifest_label`'s first 48 bits)."""
    return uuid.UUID(label.removeprefix("urn:c2pa:")[:36]).int >> (128 - MARK_ID_BITS)


def soft_binding(mark_id: int) -> dict[str, object]:
    """The manifest's assertion naming the watermark (its id, base64); :func:`watermark_of` reads it."""
    value = base64.b64encode(mark_id.to_bytes(MARK_ID_BITS // 8, "big")).decode()
    return {"label": SOFT_BINDING, "data": {"alg": WATERMARK_ALGORITHM, "blocks": [{"scope": {}, "value": value}]}}


class ProvenanceSummary(BaseModel):
    """What ``cover.completed`` says of the cover's credentials."""

    manifest_id: str = Field(description="The C2PA manifest's label (urn:c2pa:...).")
    signer: str = Field(description="The signing certificate's subject (common name, organisation).")
    issuer: str = Field(description="Its issuer's organisation.")
    ai_generated: bool = Field(True, description="Declared AI-generated (IPTC trainedAlgorithmicMedia).")
    development: bool = Field(False, description="Signed with the local development key: not a production signature.")
    watermark: str | None = Field(
        None,
        description="The id the cover's inaudible watermark carries (12 hex digits): the manifest id's first 48 bits.",
    )


class VerifyStatus(str, Enum):  # noqa: UP042 - str() of a member is its value, in messages
    VERIFIED = "verified"  # intact, and signed by a trusted certificate
    UNTRUSTED = "untrusted"  # intact, but signed by a certificate we do not trust
    TAMPERED = "tampered"  # the credentials or the audio do not match their signature
    NONE = "none"  # no credentials in the file, and no watermark of ours heard
    WATERMARK = "watermark"  # no credentials, but our watermark is in the audio: an AI cover of ours


class WatermarkReading(BaseModel):
    """What the audio's inaudible watermark says (read where a file could be decoded)."""

    found: bool
    id: str | None = Field(None, description="The id it carries (12 hex digits): its manifest id's first 48 bits.")
    sync_z: float = Field(description="How far its sync pattern stands out (robust z-score; 5.5 needed).")
    seconds: float = Field(0.0, description="How much audio was read (the mark is read reliably from 10 s).")
    matches_manifest: bool | None = Field(None, description="Whether it is the id the manifest declares.")

    def manifest_prefix(self) -> str | None:
        """The beginning of the manifest label it names (``urn:c2pa:xxxxxxxx-xxxx-4``)."""
        return None if self.id is None else manifest_label(int(self.id, 16), 0)[: len("urn:c2pa:") + 15]


class Verification(BaseModel):
    """``cover verify``'s finding."""

    file: str
    status: VerifyStatus
    said: str = Field(description="The finding in plain words.")
    summary: ProvenanceSummary | None = None
    voices: list[dict[str, Any]] = Field(default_factory=list, description="Each voice, its version and rights.")
    song: dict[str, Any] | None = None
    verdict: str | None = None
    problems: list[str] = Field(default_factory=list, description="The checker's failure codes and explanations.")
    watermark: WatermarkReading | None = None

    def with_watermark(self, reading: WatermarkReading) -> Verification:
        """This finding with what the audio's watermark says: a file without credentials whose
        watermark is ours becomes :attr:`VerifyStatus.WATERMARK`."""
        declared = self.summary.watermark if self.summary else None
        reading = reading.model_copy(
            update={"matches_manifest": None if declared is None or not reading.found else reading.id == declared}
        )
        found = self.model_copy(update={"watermark": reading})
        if not reading.found:
            return found
        names = f"its watermark names an AI-generated melodia cover, manifest {reading.manifest_prefix()}..."
        if self.status is VerifyStatus.NONE:
            found.status, found.said = VerifyStatus.WATERMARK, f"no credentials in the file, but {names}"
        elif self.status is VerifyStatus.TAMPERED:
            found.said = f"{self.said}; {names}"
        return found


def check_format(format_value: str, provenance: str) -> None:
    """``options.invalid`` for a format C2PA cannot bind into when credentials are required."""
    from shared.errors import CoverError, ErrorCode

    if provenance == "required" and format_value not in SIGNED_FORMATS:
        raise CoverError(
            ErrorCode.OPTIONS_INVALID,
            f"{format_value} covers cannot carry Content Credentials (C2PA has no binding for it), which this "
            f"deployment requires: choose {', '.join(SIGNED_FORMATS)}",
        )


SIGNED_FORMATS = ("mp3", "m4a", "flac", "wav")


BY_SUFFIX = {".mp3": "audio/mpeg", ".m4a": "audio/mp4", ".mp4": "audio/mp4", ".flac": "audio/flac", ".wav": "audio/wav"}


def summary_of(manifest: dict[str, Any], development: bool) -> ProvenanceSummary:
    """The summary of a manifest as c2pa's reader gives it."""
    info = manifest.get("signature_info") or {}
    return ProvenanceSummary(
        manifest_id=str(manifest.get("label", "")),
        signer=str(info.get("common_name", "")),
        issuer=str(info.get("issuer", "")),
        development=development,
        watermark=watermark_of(manifest),
    )


def watermark_of(manifest: dict[str, Any]) -> str | None:
    """The watermark id the manifest's soft-binding assertion declares (hex), if it has ours."""
    for assertion in manifest.get("assertions", []):
        data = assertion.get("data") or {}
        if assertion.get("label") == SOFT_BINDING and data.get("alg") == WATERMARK_ALGORITHM:
            blocks = data.get("blocks") or [{}]
            try:
                return base64.b64decode(str(blocks[0].get("value", ""))).hex() or None
            except ValueError:
                return None
    return None


def verify(path: Path, trusted_pem: str) -> Verification:
    """What ``path``'s credentials say, and whether its audio and manifest are intact and signed by
    a certificate issued by one of ``trusted_pem``'s CAs."""
    import c2pa

    media_type = BY_SUFFIX.get(path.suffix.lower())
    if media_type is None:
        return Verification(
            file=str(path),
            status=VerifyStatus.NONE,
            said=f"no credentials: {path.suffix or 'this'} files carry none here (mp3, m4a, flac and wav do)",
        )
    settings: dict[str, object] = {"verify": {"verify_trust": bool(trusted_pem)}}
    if trusted_pem:
        settings["trust"] = {"trust_anchors": trusted_pem}
    try:
        with open(path, "rb") as stream:
            reader = c2pa.Reader(media_type, stream, context=c2pa.Context.from_dict(settings))
            state = reader.get_validation_state() or ""
            manifest = reader.get_active_manifest() or {}
            results = reader.get_validation_results() or {}
    except c2pa.C2paError as exc:
        if "ManifestNotFound" in type(exc).__name__ or "no JUMBF" in str(exc):
            return Verification(
                file=str(path), status=VerifyStatus.NONE, said="no credentials: the file carries no C2PA manifest"
            )
        return Verification(
            file=str(path),
            status=VerifyStatus.TAMPERED,
            said=f"the credentials cannot be read: {exc}",
            problems=[str(exc)],
        )
    failures = [
        f"{f.get('code')}: {f.get('explanation')}" for f in (results.get("activeManifest") or {}).get("failure", [])
    ]
    ours: dict[str, Any] = next(
        (a.get("data", {}) for a in manifest.get("assertions", []) if a.get("label") == COVER_ASSERTION), {}
    )
    summary = summary_of(manifest, bool(ours.get("development_signature")))
    facts = {
        "summary": summary,
        "voices": ours.get("voices", []),
        "song": ours.get("song"),
        "verdict": ours.get("verdict"),
    }
    if state == "Trusted":
        status, said = VerifyStatus.VERIFIED, "verified: intact, and signed by a trusted certificate"
    elif state == "Valid" and not [f for f in failures if not f.startswith("signingCredential.untrusted")]:
        status, said = (
            VerifyStatus.UNTRUSTED,
            f"intact, but signed by a certificate this check does not trust ({summary.signer}, "
            f"issued by {summary.issuer})",
        )
    else:
        edited = any("hash" in f for f in failures)
        status = VerifyStatus.TAMPERED
        said = (
            "the audio was changed after signing: it no longer matches its credentials"
            if edited
            else "the credentials do not match their signature"
        )
    if summary.development and status is VerifyStatus.VERIFIED:
        said += " (a development signature: trusted on this machine only)"
    return Verification(file=str(path), status=status, said=said, problems=failures, **facts)
