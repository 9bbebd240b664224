"""``cover models fetch``: the public base models, from where their authors publish them.

* ``hubert``: HuBERT base, RVC's content encoder (fairseq's checkpoint as RVC distributions ship it,
  from ``huggingface.co/lj1995/VoiceConversionWebUI``), into ``base/hubert/hubert_base.pt``;
* ``rmvpe``: the pitch model RMVPE, from the same repository, into ``base/rmvpe.pt``;
* ``htdemucs``: Demucs v4's separator, from ``dl.fbaipublicfiles.com/demucs`` (Demucs' own remote),
  into ``separation/955717e8-8726e21a.th`` with its bag ``separation/htdemucs.yaml``;
* ``fcpe``: the FCPE pitch model, the one file of torchfcpe 0.0.4's wheel on PyPI we use (the
  package imports torchaudio, so it is never installed): the wheel is downloaded and checked
  against its own pins, the member taken out and checked against its, into ``base/fcpe.pt``. By
  hand: ``pip download --no-deps torchfcpe==0.0.4 && unzip -p torchfcpe-0.0.4-py3-none-any.whl
  torchfcpe/assets/fcpe_c_v001.pt > base/fcpe.pt`` (then ``sha256sum`` against the pin).

Sizes and sha256 are pinned in :data:`PUBLIC_MODELS`. Each file is downloaded through the URL guard
(:mod:`job.render.media.download`) into the store's ``.fetch/`` folder, resumed with a range request
when an earlier run broke off, and checked against its pinned size and sha256 before it enters the
store; one that does not match is deleted and refused (``model.hash_mismatch``), and the store is
left as it was. Installing a model replaces what
held its place (the random-weight demo models of ``cover demo``). ``COVER_MODELS_MIRROR`` points the
downloads at a server holding the same files under their store paths, and an archive under its
own file name (an internal mirror; the tests' loopback server); the pins stay the same.
"""

from __future__ import annotations

import os
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

from pydantic import BaseModel

from job.render.media.download import UrlPolicy, download
from shared.errors import CoverError, ErrorCode
from shared.hashing import sha256_of
from shared.model_store import CONTENT_ENCODER_DIR, FCPE_MODEL_FILE, PITCH_MODEL_FILE, SEPARATION_DIR, ModelStore

FETCH_DIR = ".fetch"  # partial and verified downloads, under the store's root
FETCH_DEADLINE_S = 3600.0  # per file: 190 MB at 0.5 Mbit/s


class PublicModel(BaseModel):
    """One base-model file at its public location, pinned by size and sha256."""

    name: str
    what: str
    path: str  # in the store
    url: str
    size: int
    sha256: str
    replaces: list[str] = []  # store paths (globs) it takes the place of: removed when it is installed
    companions: dict[str, str] = {}  # small files written beside it (store path: text)
    optional: bool = False  # fetched only when named
    member: str | None = None  # the file is this member of the archive at ``url`` (a wheel)
    archive_size: int | None = None  # the archive's pins, checked before the member is read
    archive_sha256: str | None = None


HTDEMUCS_SIG = "955717e8"
PUBLIC_MODELS: tuple[PublicModel, ...] = (
    PublicModel(
        name="hubert",
        what="the content encoder (HuBERT base)",
        path=f"{CONTENT_ENCODER_DIR}/hubert_base.pt",
        url="https://huggingface.co/lj1995/VoiceConversionWebUI/resolve/main/hubert_base.pt",
        size=189_507_909,
        sha256="f54b40fd2802423a5643779c4861af1e9ee9c1564dc9d32f54f20b5ffba7db96",
        replaces=[f"{CONTENT_ENCODER_DIR}/*"],
    ),
    PublicModel(
        name="rmvpe",
        what="the pitch model (RMVPE)",
        path=PITCH_MODEL_FILE,
        url="https://huggingface.co/lj1995/VoiceConversionWebUI/resolve/main/rmvpe.pt",
        size=181_184_272,
        sha256="6d62215f4306e3ca278246188607209f09af3dc77ed4232efdd069798c4ec193",
    ),
    PublicModel(
        name="htdemucs",
        what="the separator (Demucs v4, htdemucs)",
        path=f"{SEPARATION_DIR}/{HTDEMUCS_SIG}-8726e21a.th",
        url=f"https://dl.fbaipublicfiles.com/demucs/hybrid_transformer/{HTDEMUCS_SIG}-8726e21a.th",
        size=84_141_911,
        sha256="8726e21a993978c7ba086d3872e7608d7d5bfca646ca4aca459ffda844faa8b4",
        replaces=[f"{SEPARATION_DIR}/{HTDEMUCS_SIG}.th", f"{SEPARATION_DIR}/{HTDEMUCS_SIG}-*.th"],
        companions={f"{SEPARATION_DIR}/htdemucs.yaml": f"models: ['{HTDEMUCS_SIG}']\n"},
    ),
    PublicModel(  # the one file of torchfcpe's wheel we use (the package imports torchaudio: never installed)
        name="fcpe",
        what="the FCPE pitch model (torchfcpe 0.0.4's fcpe_c_v001.pt)",
        path=FCPE_MODEL_FILE,
        url=(
            "https://files.pythonhosted.org/packages/15/98/"
            "66da447498a2835b01cb3ae851e1333035a9fbf228e5c6f3e3c4351c06b6/torchfcpe-0.0.4-py3-none-any.whl"
        ),
        size=43_363_260,
        sha256="b9aeaeb673436eeda50ceafd632aa681aa63417e52eae4207503d180c9b10015",
        member="torchfcpe/assets/fcpe_c_v001.pt",
        archive_size=40_222_012,
        archive_sha256="f042c463d850d76c6f4899a0b84f0b694bb560adf05f4de951097a756d17472d",
        optional=True,
    ),
)
MODEL_NAMES = tuple(m.name for m in PUBLIC_MODELS)

FileProgress = Callable[[PublicModel, int, int], None]  # (model, bytes so far, its size)


class FetchReport(BaseModel):
    fetched: list[str] = []
    unchanged: list[str] = []


def _matches(path: Path, model: PublicModel) -> bool:
    return path.is_file() and path.stat().st_size == model.size and sha256_of(path) == model.sha256


def _install(store: ModelStore, model: PublicModel, verified: Path) -> None:
    for pattern in model.replaces:
        for old in store.root.glob(pattern):
            if old.is_dir():
                shutil.rmtree(old)
            else:
                old.unlink()
    target = store.root / model.path
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(verified, target)
    for rel, text in model.companions.items():
        (store.root / rel).write_text(text)


def _mirrored(model: PublicModel, mirror: str) -> str:
    """Where a mirror holds a file: under its store path, or an archive under its own file name."""
    name = urlsplit(model.url).path.rsplit("/", 1)[-1] if model.member else model.path
    return f"{mirror.rstrip('/')}/{name}"


def _fetch_member(model: PublicModel, url: str, staged: Path, policy: UrlPolicy, progress: FileProgress | None) -> None:
    """The archive downloaded (resumable, checked against its own pins), the one member taken out."""
    size, digest = model.archive_size or 0, model.archive_sha256 or ""
    archive = staged.with_name(staged.name + ".archive")
    limits = policy.model_copy(update={"max_bytes": size, "deadline_s": FETCH_DEADLINE_S})
    on_bytes = None if progress is None else (lambda done, _total: progress(model, done, size))
    download(url, archive, limits, resume=True, progress=on_bytes)
    if archive.stat().st_size != size or sha256_of(archive) != digest:
        archive.unlink()
        raise CoverError(
            ErrorCode.MODEL_HASH_MISMATCH,
            f"the archive holding {model.what} from {url} does not match its pinned size and sha256; "
            "it was deleted and nothing was installed",
        )
    try:
        with zipfile.ZipFile(archive) as zf, zf.open(str(model.member)) as source, open(staged, "wb") as out:
            shutil.copyfileobj(source, out)
    except (KeyError, zipfile.BadZipFile) as exc:
        staged.unlink(missing_ok=True)
        raise CoverError(ErrorCode.MODEL_CORRUPT, f"{model.member} cannot be read from {url}: {exc}") from None
    finally:
        archive.unlink(missing_ok=True)


def fetch_base_models(
    store: ModelStore,
    policy: UrlPolicy,
    names: list[str] | None = None,
    mirror: str | None = None,
    progress: FileProgress | None = None,
) -> FetchReport:
    """Download the public base models into ``store``, each checked before it enters it.

    Args:
        store: the local model store
        policy: what the downloads may reach (its size limit is each file's pinned size)
        names: which models (of :data:`MODEL_NAMES`; default: all but the optional ``fcpe``)
        mirror: a base URL holding the files under their store paths, instead of their public locations
        progress: called as each file's bytes arrive
    """
    unknown = sorted(set(names or []) - set(MODEL_NAMES))
    if unknown:
        raise CoverError(
            ErrorCode.OPTIONS_INVALID, f"no base model {', '.join(unknown)} (known: {', '.join(MODEL_NAMES)})"
        )
    report = FetchReport()
    for model in PUBLIC_MODELS:
        if (names and model.name not in names) or (not names and model.optional):
            continue
        if _matches(store.root / model.path, model):
            report.unchanged.append(model.name)
            continue
        staged = store.root / FETCH_DIR / model.path
        staged.parent.mkdir(parents=True, exist_ok=True)
        if not _matches(staged, model):  # else verified by an earlier run that stopped before installing
            url = _mirrored(model, mirror) if mirror else model.url
            if model.member is not None:
                _fetch_member(model, url, staged, policy, progress)
            else:
                limits = policy.model_copy(update={"max_bytes": model.size, "deadline_s": FETCH_DEADLINE_S})
                on_bytes = None if progress is None else (lambda done, _total, m=model: progress(m, done, m.size))
                download(url, staged, limits, resume=True, progress=on_bytes)
            if not _matches(staged, model):
                got = staged.stat().st_size
                staged.unlink()
                raise CoverError(
                    ErrorCode.MODEL_HASH_MISMATCH,
                    f"{model.what} from {url} does not match its pinned size and sha256 ({got} bytes, expected "
                    f"{model.size}); it was deleted and nothing was installed",
                )
        _install(store, model, staged)
        report.fetched.append(model.name)
    shutil.rmtree(store.root / FETCH_DIR, ignore_errors=True)
    return report
