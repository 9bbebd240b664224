"""``cover models add / verify``: bring community voices into the store, and check the store.

A voice arrives as a ``.pth``, a folder, or a ``.zip`` (as RVC voices are shared) holding one
inference ``.pth`` (training checkpoints ``G_*.pth``/``D_*.pth`` are ignored) and optionally a
``.index``; from a local path or an http(s) URL. It is checked (safe, strict load; index
dimension) in a staging folder and moved into ``voices/NAME`` in one rename, so a bad file leaves
the store exactly as it was.
"""

from __future__ import annotations

import lzma
import shutil
import tempfile
import zipfile
import zlib
from pathlib import Path
from urllib.parse import urlsplit

from pydantic import BaseModel

from job.render.media.download import UrlPolicy, download, is_url
from job.render.rvc.checkpoint import build_synthesizer, read_checkpoint
from job.render.rvc.retrieval import FeatureIndex
from shared.errors import CoverError, ErrorCode, no_space
from shared.model_store import ModelStore
from shared.names import safe_file_name
from shared.voices import INDEX_FILE, MODEL_FILE, VOICE_FILE, VoiceInfo, VoiceRights, digest_of, slugify

MAX_VOICE_BYTES = 2 * 2**30  # a zip may not unpack to more than this


class VerifyReport(BaseModel):
    name: str
    ok: bool
    problems: list[str]


def _pick(files: list[Path], suffix: str, what: str) -> Path | None:
    found = [f for f in files if f.suffix.lower() == suffix and not f.name.startswith(("G_", "D_", "."))]
    if len(found) > 1:
        names = ", ".join(f.name for f in found)
        raise CoverError(ErrorCode.OPTIONS_INVALID, f"several {what} files found ({names}); add one of them directly")
    return found[0] if found else None


def _unzip(archive: Path, dest: Path) -> list[Path]:
    try:
        with zipfile.ZipFile(archive) as zf:
            members = [m for m in zf.infolist() if not m.is_dir() and m.filename.lower().endswith((".pth", ".index"))]
            if sum(m.file_size for m in members) > MAX_VOICE_BYTES:
                raise CoverError(
                    ErrorCode.MODEL_CORRUPT, f"{archive.name} unpacks to more than {MAX_VOICE_BYTES} bytes"
                )
            out = []
            for i, member in enumerate(members):
                target = dest / str(i) / safe_file_name(member.filename, f"member-{i}")  # inside dest/i
                target.parent.mkdir()
                with zf.open(member) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                out.append(target)
            return out
    except zipfile.BadZipFile:
        raise CoverError(ErrorCode.MODEL_CORRUPT, f"{archive.name} is not a valid zip archive") from None
    except (NotImplementedError, RuntimeError, EOFError, zlib.error, lzma.LZMAError, OSError) as exc:
        # an encrypted entry (RuntimeError), a method Python cannot unpack such as deflate64
        # (NotImplementedError), a stream cut short or damaged inside a valid directory
        if (full := no_space(exc)) is not None:
            raise full from None
        raise CoverError(ErrorCode.MODEL_CORRUPT, f"{archive.name} cannot be unpacked: {exc}") from None


def _gather(source: str, scratch: Path, policy: UrlPolicy) -> tuple[Path, Path | None, str]:
    """Locate (model.pth, model.index or None, default name) for ``source``."""
    if is_url(source):
        local = download(source, scratch / safe_file_name(urlsplit(source).path, "voice.pth"), policy)
    else:
        local = Path(source).expanduser()
        if not local.exists():
            raise CoverError(ErrorCode.INPUT_NOT_FOUND, f"voice source not found: {local}")
    stem = local.stem
    if local.is_dir():
        files = sorted(p for p in local.rglob("*") if p.is_file())
    elif local.suffix.lower() == ".zip":
        files = _unzip(local, scratch)
    else:
        files = [local]
    pth = _pick(files, ".pth", "model")
    if pth is None:
        raise CoverError(ErrorCode.MODEL_MISSING, f"{local.name} holds no voice model (.pth)")
    return (
        pth,
        _pick(files, ".index", "index"),
        (stem if local.suffix.lower() == ".zip" or local.is_dir() else pth.stem),
    )


def add_voice(
    store: ModelStore,
    source: str,
    name: str | None = None,
    replace: bool = False,
    vocal_range_hz: tuple[float, float] | None = None,
    policy: UrlPolicy | None = None,
    rights: VoiceRights | None = None,
) -> VoiceInfo:
    """Check a voice and move it into ``store`` in one rename; its ``voice.json`` (with the sha256 of
    each file). A bad or malicious file leaves the store as it was.

    Args:
        store: the local model store the voice goes into
        source: a ``.pth``, a folder or a ``.zip``, as a local path or an http(s) URL
        name: the voice's name (default: from the source's file name, made a slug)
        replace: replace an installed voice of that name (otherwise refused)
        vocal_range_hz: the voice's sung range, for ``pitch=auto`` (written into ``voice.json``)
        policy: what a URL may reach and how much it may download (default: the settings')
        rights: the voice's rights record (whose voice, who consented, on what terms)
    """
    store.voices_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=store.voices_dir, prefix=".incoming-") as tmp:
        scratch = Path(tmp)
        pth, index, default_name = _gather(source, scratch, policy or UrlPolicy(max_bytes=MAX_VOICE_BYTES))
        voice_name = slugify(name or default_name)
        if store.voice_folder(voice_name).exists() and not replace:
            raise CoverError(ErrorCode.OPTIONS_INVALID, f"voice '{voice_name}' already exists (use --replace)")
        ckpt = read_checkpoint(pth)
        synth = build_synthesizer(ckpt, pth.name)
        staged = scratch / "voice"
        staged.mkdir()
        shutil.copyfile(pth, staged / MODEL_FILE)
        if index is not None:
            feature_index = FeatureIndex.load(index)
            if feature_index.dim != synth.content_dim:
                raise CoverError(
                    ErrorCode.MODEL_MISMATCH,
                    f"{index.name} holds {feature_index.dim}-dim features; the voice takes {synth.content_dim}",
                )
            shutil.copyfile(index, staged / INDEX_FILE)
        files = {f.name: digest_of(f) for f in sorted(staged.iterdir())}
        info = VoiceInfo(
            name=voice_name,
            display_name=name or default_name,
            description=ckpt.info or f"RVC {ckpt.version} voice",
            rvc_version=ckpt.version,
            sample_rate=ckpt.config.sr,
            f0=ckpt.f0,
            has_index=index is not None,
            vocal_range_hz=vocal_range_hz,
            speakers=ckpt.config.spk_embed_dim,
            rights=rights,
            files=files,
        )
        (staged / VOICE_FILE).write_text(info.model_dump_json(indent=2))
        target = store.voice_folder(voice_name)
        if target.exists():
            old = scratch / "old"
            target.rename(old)
        staged.rename(target)
    return info


def verify_store(store: ModelStore, names: list[str] | None = None) -> list[VerifyReport]:
    """Hashes and loadability of each local voice (all when ``names`` is empty)."""
    reports = []
    for voice_name in names or [v.name for v in store.local_voices()]:
        try:
            problems = store.verify_voice(voice_name)
            if not problems:
                voice = store.voice(voice_name)
                build_synthesizer(read_checkpoint(voice.model_path), voice_name)
                if voice.index_path is not None:
                    FeatureIndex.load(voice.index_path)
        except CoverError as exc:
            problems = [str(exc)]
        reports.append(VerifyReport(name=voice_name, ok=not problems, problems=problems))
    return reports
