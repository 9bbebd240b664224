"""Content Credentials: each format C2PA binds into is signed, read back and checked; an edit of
one audio byte, a stripped manifest and a key nobody trusts are each told apart; a rotated key
still verifies; the command line says so by exit status."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization

from job.render import credentials
from job.render.media.audio import MIX_SAMPLE_RATE, write_wav
from shared.provenance import VerifyStatus, verify
from shared.voices import DEMO_RIGHTS
from tests.conftest import run_cover

FORMATS = {"mp3": "audio/mpeg", "m4a": "audio/mp4", "flac": "audio/flac", "wav": "audio/wav"}
FACTS = credentials.CoverFacts(
    title="song-1 (demo cover)",
    song="song-1",
    song_sha256="ab" * 32,
    voices=[credentials.VoiceFact(name="demo-voice", version="0123456789abcdef", rights=DEMO_RIGHTS)],
    actions=["vocals separated from the song (htdemucs)", "vocals re-sung by demo-voice (RVC)"],
    verdict="passed",
)


def _encoded(tmp_path: Path, ext: str, name: str = "cover") -> Path:
    noise = (0.1 * np.random.default_rng(0).standard_normal((2, 2 * MIX_SAMPLE_RATE))).astype(np.float32)
    wav = write_wav(tmp_path / "mix.wav", noise, MIX_SAMPLE_RATE)
    out = tmp_path / f"{name}.{ext}"
    muxer = ["-f", "ipod"] if ext == "m4a" else []
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-i", str(wav), *muxer, str(out)], check=True)
    return out


def _production(tmp_path: Path, name: str) -> credentials.Identity:
    """A production-style identity (key and chain as Secret Manager would hold them)."""
    ca, chain, key = credentials._issue(f"melodia-cover {name}")
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return credentials.identity(pem.decode(), chain.decode(), ca.decode(), tmp_path / name)


@pytest.mark.parametrize("ext", FORMATS)
def test_each_format_is_signed_read_back_and_any_edit_or_strip_or_stranger_is_told_apart(tmp_path, ext):
    me = credentials.identity(None, None, None, tmp_path / "state")
    cover = _encoded(tmp_path, ext)
    summary = credentials.sign(cover, FORMATS[ext], FACTS, me)
    assert summary.manifest_id.startswith("urn:c2pa:") and summary.ai_generated and summary.development
    found = verify(cover, me.trusted_pem)
    assert found.status is VerifyStatus.VERIFIED and "development signature" in found.said
    assert found.voices[0]["rights"]["terms"] == "CC0-1.0" and found.song == {"id": "song-1", "audio_sha256": "ab" * 32}
    assert found.verdict == "passed"
    edited = tmp_path / f"edited.{ext}"
    data = bytearray(cover.read_bytes())
    data[len(data) * 3 // 4] ^= 0x01  # one bit of one audio byte
    edited.write_bytes(bytes(data))
    tampered = verify(edited, me.trusted_pem)
    assert tampered.status is VerifyStatus.TAMPERED and "changed after signing" in tampered.said
    stripped = _encoded(tmp_path, ext, name="stripped")  # the same audio, its manifest gone
    assert verify(stripped, me.trusted_pem).status is VerifyStatus.NONE
    stranger = credentials.identity(None, None, None, tmp_path / "elsewhere")  # another machine's key
    untrusted = verify(cover, stranger.trusted_pem)
    assert untrusted.status is VerifyStatus.UNTRUSTED and "does not trust" in untrusted.said


def test_a_rotated_key_verifies_with_the_previous_certificate_still_trusted(tmp_path):
    previous, current = _production(tmp_path, "2025"), _production(tmp_path, "2026")
    old_cover, new_cover = _encoded(tmp_path, "mp3", "old"), _encoded(tmp_path, "mp3", "new")
    credentials.sign(old_cover, "audio/mpeg", FACTS, previous)
    summary = credentials.sign(new_cover, "audio/mpeg", FACTS, current)
    assert summary.development is False and summary.issuer == "melodia-cover 2026"
    both = previous.trusted_pem + current.trusted_pem
    assert [verify(c, both).status for c in (old_cover, new_cover)] == [VerifyStatus.VERIFIED] * 2
    after_retirement = current.trusted_pem  # the previous CA dropped from the bundle
    assert verify(old_cover, after_retirement).status is VerifyStatus.UNTRUSTED


def test_the_development_key_is_made_once_readable_by_its_owner_only(tmp_path):
    first = credentials.development_identity(tmp_path / "signing")
    again = credentials.development_identity(tmp_path / "signing")
    assert first.key_pem == again.key_pem and first.development
    assert (tmp_path / "signing" / "dev-signer.key").stat().st_mode & 0o077 == 0
    from cryptography import x509

    subject = x509.load_pem_x509_certificate(first.chain_pem).subject.rfc4514_string()
    assert "melodia-cover development signature" in subject  # what a reader of the manifest sees


def test_cover_verify_says_it_in_words_and_by_exit_status(tmp_path):
    env = {**os.environ, "COVER_STATE_DIR": str(tmp_path / "state")}
    me = credentials.identity(None, None, None, tmp_path / "state")
    cover = _encoded(tmp_path, "flac")
    credentials.sign(cover, "audio/flac", FACTS, me)
    done = run_cover(["verify", str(cover)], env)
    assert done.returncode == 0, done.stderr
    assert "verified" in done.stdout and "voice demo-voice" in done.stdout and "AI-generated: yes" in done.stdout
    data = bytearray(cover.read_bytes())
    data[len(data) * 3 // 4] ^= 0x01
    cover.write_bytes(bytes(data))
    tampered = run_cover(["verify", str(cover), "--json"], env)
    assert tampered.returncode == 7 and json.loads(tampered.stdout)["status"] == "tampered"
    plain = _encoded(tmp_path, "flac", "plain")
    assert run_cover(["verify", str(plain)], env).returncode == 9
    other = _encoded(tmp_path, "flac", "other")
    credentials.sign(other, "audio/flac", FACTS, credentials.identity(None, None, None, tmp_path / "x"))
    assert run_cover(["verify", str(other)], env).returncode == 8


def test_cover_make_signs_its_cover_and_opus_is_said_or_refused(env, song, tmp_path):
    env = {**env, "COVER_STATE_DIR": str(tmp_path / "state"), "COVER_QUALITY": "off"}  # the scores are not the point
    out = tmp_path / "cover.mp3"
    fast = ["--f0-method", "pm", "--allow-no-vocals"]
    done = run_cover(["make", str(song), "--voice", "demo-voice", "-o", str(out), *fast, "--json"], env)
    assert done.returncode == 0, done.stderr
    provenance = json.loads(done.stdout)["provenance"]
    assert provenance["development"] is True
    mark = provenance["watermark"]  # the inaudible watermark's id begins the manifest's id
    assert len(mark) == 12 and provenance["manifest_id"].startswith(f"urn:c2pa:{mark[:8]}-{mark[8:]}-4")
    verified = run_cover(["verify", str(out)], env)
    assert verified.returncode == 0 and "song song.wav" in verified.stdout, verified.stdout
    opus = run_cover(["make", str(song), "--voice", "demo-voice", "-o", str(tmp_path / "c.opus"), *fast], env)
    assert opus.returncode == 0 and "credentials: none" in opus.stdout
    required = {**env, "COVER_PROVENANCE": "required"}
    refused = run_cover(["make", str(song), "--voice", "demo-voice", "-o", str(tmp_path / "r.opus"), *fast], required)
    assert refused.returncode == 3 and "[options.invalid]" in refused.stderr and "Content Credentials" in refused.stderr
    assert not (tmp_path / "r.opus").exists()
