"""Content Credentials (C2PA) in every cover, and the check anyone can run on one.

A cover's manifest (c2pa-python, embedded in MP3, M4A, FLAC and WAV) declares the audio
AI-generated (the ``c2pa.created`` action with IPTC's ``trainedAlgorithmicMedia``), names the
generator and what was done (separated, converted, mixed, the effects), and carries our
assertion ``org.melodia.cover``: every voice with its version and rights record, the song (its id
and the sha256 of its decoded audio), the quality verdict. The song and the voices are listed as
ingredients too. The signature covers the manifest and the file's audio bytes (C2PA's hard
binding): any edit of the audio, or of the manifest, fails the check. The manifest's label
begins with the id of the cover's inaudible watermark (``job/render/mix/watermark.py``), which a
``c2pa.soft-binding`` assertion names too: a file stripped of its manifest still says which it was.

**Keys.** In production the signing key and its certificate chain come from Secret Manager
(``COVER_SIGNING_KEY``, ``COVER_SIGNING_CERTS``: the job's and the GPU runners' secrets, never in
an image or a file), and the verifier trusts the CA certificates in ``COVER_TRUSTED_CERTS`` (the
current and the previous one while a key is rotated). Without them, a development CA and signing
key are generated on first use into ``COVER_STATE_DIR/signing`` (the key readable by its owner
only); their certificates say "melodia-cover development signature", the summary says
``development: true`` and the command line says so: they are trusted by this machine's own
``cover verify`` and by nobody else.

**Opus** has no C2PA binding: under ``COVER_PROVENANCE=required`` (the deployment) an opus cover is
refused before any work (``options.invalid``); with ``sign`` (local) it is written unsigned and the
command line says so.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from shared.errors import CoverError, ErrorCode
from shared.options import OutputFormat
from shared.provenance import (
    AI_SOURCE_TYPE,
    COVER_ASSERTION,
    DEVELOPMENT_SIGNER,
    ProvenanceSummary,
    manifest_label,
    soft_binding,
    summary_of,
)
from shared.voices import VoiceRights

log = logging.getLogger("melodia.credentials")
GENERATOR = "melodia-cover"
MEDIA_TYPES = {  # the formats C2PA binds a manifest into
    OutputFormat.MP3: "audio/mpeg",
    OutputFormat.M4A: "audio/mp4",
    OutputFormat.FLAC: "audio/flac",
    OutputFormat.WAV: "audio/wav",
}


class Identity(BaseModel):
    """A signing key, its certificate chain (signer first) and the CA certificates a verifier trusts."""

    chain_pem: bytes
    key_pem: bytes = Field(repr=False)
    trusted_pem: str
    development: bool


class VoiceFact(BaseModel):
    name: str
    version: str
    rights: VoiceRights | None = None


class CoverFacts(BaseModel):
    """What a cover's manifest says of it."""

    title: str
    song: str = Field(description="The song's id in the catalog, or its file name.")
    song_sha256: str = Field(description="The sha256 of the song's decoded audio.")
    voices: list[VoiceFact]
    actions: list[str] = Field(description="What was done, in order, in words.")
    verdict: str | None = None


def _generator_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("melodia-cover")
    except PackageNotFoundError:
        return "unknown"


# --- keys ----------------------------------------------------------------------------------------
def development_identity(folder: Path) -> Identity:
    """The local development CA and signing key in ``folder``, generated on first use (ES256) in a
    folder of their own and renamed into place, so processes starting at once agree on one key."""
    from cryptography.hazmat.primitives import serialization

    ca_file, chain_file, key_file = folder / "dev-ca.pem", folder / "dev-signer.pem", folder / "dev-signer.key"
    if not folder.is_dir():
        folder.parent.mkdir(parents=True, exist_ok=True)
        staged = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}-"))
        ca_pem, chain_pem, key = _issue(DEVELOPMENT_SIGNER)
        fd = os.open(staged / key_file.name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(
                key.private_bytes(
                    serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
                )
            )
        (staged / chain_file.name).write_bytes(chain_pem)
        (staged / ca_file.name).write_bytes(ca_pem)
        try:
            staged.rename(folder)
            log.info("development signing key generated in %s", folder)
        except OSError:  # another process's key got there first: use it
            shutil.rmtree(staged, ignore_errors=True)
    return Identity(
        chain_pem=chain_file.read_bytes(),
        key_pem=key_file.read_bytes(),
        trusted_pem=ca_file.read_text(),
        development=True,
    )


def _issue(organisation: str, days: int = 3650) -> tuple[bytes, bytes, Any]:
    """A CA and an ES256 signing certificate it issued, with the extensions C2PA requires."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)

    def name(common: str) -> x509.Name:
        return x509.Name(
            [
                x509.NameAttribute(NameOID.COMMON_NAME, common),
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, organisation),
            ]
        )

    def usage(sign: bool) -> x509.KeyUsage:
        return x509.KeyUsage(
            digital_signature=sign, content_commitment=False, key_encipherment=False, data_encipherment=False,
            key_agreement=False, key_cert_sign=not sign, crl_sign=not sign, encipher_only=False, decipher_only=False,
        )  # fmt: skip

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    start, end = now - datetime.timedelta(days=1), now + datetime.timedelta(days=days)
    ca = (
        x509.CertificateBuilder().subject_name(name(f"{organisation} CA")).issuer_name(name(f"{organisation} CA"))
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(usage(sign=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    leaf = (
        x509.CertificateBuilder().subject_name(name(f"{organisation} signer")).issuer_name(ca.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(usage(sign=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    pem = serialization.Encoding.PEM
    return ca.public_bytes(pem), leaf.public_bytes(pem) + ca.public_bytes(pem), key


def identity(
    signing_key: str | None, signing_certs: str | None, trusted_certs: str | None, state_dir: Path
) -> Identity:
    """The production identity when its key and chain are set (from Secret Manager), else the
    development one.

    Args:
        signing_key: the PEM private key (``COVER_SIGNING_KEY``)
        signing_certs: its PEM certificate chain, signer first (``COVER_SIGNING_CERTS``)
        trusted_certs: the PEM CA certificates a verifier trusts (``COVER_TRUSTED_CERTS``: current and previous)
        state_dir: where the development key lives (``COVER_STATE_DIR``)
    """
    if signing_key and signing_certs:
        return Identity(
            chain_pem=signing_certs.encode(),
            key_pem=signing_key.encode(),
            trusted_pem=trusted_certs or "",
            development=False,
        )
    if signing_key or signing_certs:
        raise CoverError(ErrorCode.INTERNAL, "COVER_SIGNING_KEY and COVER_SIGNING_CERTS are set together or not at all")
    found = development_identity(state_dir / "signing")
    return found.model_copy(update={"trusted_pem": found.trusted_pem + (trusted_certs or "")})


# --- signing -------------------------------------------------------------------------------------
def manifest_definition(
    facts: CoverFacts, media_type: str, development: bool, mark_id: int | None = None
) -> dict[str, object]:
    """The manifest (c2pa's JSON definition); with a watermark id, the label begins with it
    (:func:`shared.provenance.manifest_label`) and a soft-binding assertion names it.

    Args:
        facts: what the manifest says
        media_type: the file's media type
        development: signed with the development key (our assertion says so)
        mark_id: the cover's watermark id (None: no watermark)
    """
    version = _generator_version()
    actions: list[dict[str, object]] = [
        {
            "action": "c2pa.created",
            "digitalSourceType": AI_SOURCE_TYPE,
            "softwareAgent": {"name": GENERATOR, "version": version},
            "parameters": {"description": "an AI cover: the song's vocals re-sung by a voice model"},
        }
    ]
    actions += [{"action": "c2pa.edited", "parameters": {"description": said}} for said in facts.actions]
    ours = {
        "voices": [v.model_dump(mode="json") for v in facts.voices],
        "song": {"id": facts.song, "audio_sha256": facts.song_sha256},
        "verdict": facts.verdict,
        "development_signature": development,
    }
    ingredients = [
        {"title": facts.song, "format": "audio/wav", "relationship": "inputTo",
         "instance_id": f"sha256:{facts.song_sha256}"}
    ] + [
        {"title": f"voice model {v.name}", "format": "application/octet-stream", "relationship": "inputTo",
         "instance_id": f"voice:{v.name}:{v.version}"}
        for v in facts.voices
    ]  # fmt: skip
    assertions: list[dict[str, object]] = [
        {"label": "c2pa.actions.v2", "data": {"actions": actions}},
        {"label": COVER_ASSERTION, "data": ours},
    ]
    definition: dict[str, object] = {
        "claim_generator_info": [{"name": GENERATOR, "version": version}],
        "title": facts.title,
        "format": media_type,
        "ingredients": ingredients,
        "assertions": assertions,
    }
    if mark_id is not None:
        definition["label"] = manifest_label(mark_id, secrets.randbits(74))
        assertions.append(soft_binding(mark_id))
    return definition


def sign(
    path: Path, media_type: str, facts: CoverFacts, who: Identity, mark_id: int | None = None
) -> ProvenanceSummary:
    """Embed a signed manifest into the cover at ``path`` (rewritten in place, atomically).

    Args:
        path: the cover's file
        media_type: its media type (:data:`MEDIA_TYPES`)
        facts: what the manifest says
        who: the signing identity
        mark_id: the id the cover's watermark carries (its manifest's label begins with it)
    """
    import c2pa

    signer = c2pa.Signer.from_info(c2pa.C2paSignerInfo("es256", who.chain_pem, who.key_pem, None))
    builder = c2pa.Builder.from_json(json.dumps(manifest_definition(facts, media_type, who.development, mark_id)))
    staged = path.with_name(f".{path.name}.signed")
    try:
        with open(path, "rb") as source, open(staged, "w+b") as dest:
            builder.sign(signer, media_type, source, dest)
        os.replace(staged, path)
    except c2pa.C2paError as exc:
        raise CoverError(ErrorCode.INTERNAL, f"signing the cover's credentials failed: {exc}") from None
    finally:
        staged.unlink(missing_ok=True)
    with open(path, "rb") as signed:  # read back as a stream: a WAV cover is tens of MB
        manifest = c2pa.Reader(media_type, signed).get_active_manifest() or {}
    return summary_of(manifest, who.development)
