"""``cover models fetch`` against a loopback mirror (``COVER_MODELS_MIRROR``; the URL guard lets it
reach 127.0.0.1 through ``COVER_URL_ALLOW_NETWORKS``, a setting for development and tests). The
public files are hundreds of megabytes and nothing may be downloaded here, so the tests pin small
stand-ins: a real (tiny) Demucs package under its checksum name, and random bytes for HuBERT and
RMVPE, which these tests do not load. The real pins are checked for form."""

from __future__ import annotations

import hashlib
import http.server
import os
import re
import threading
import zipfile
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
from in_process import run_main

from job.cli import base_models
from job.cli.base_models import PUBLIC_MODELS, PublicModel, fetch_base_models
from job.devkit import demo
from job.render.media.download import UrlPolicy
from job.render.rvc.fcpe import FCPE_SHA256
from shared.errors import CoverError, ErrorCode
from shared.model_store import ModelStore


class Mirror(http.server.BaseHTTPRequestHandler):
    """Serves ``files`` (path: bytes) with range requests; ``fault`` makes it misbehave:
    ``truncate`` (announce the whole length, send half, hang up), ``no-ranges`` (always the whole
    file)."""

    files: ClassVar[dict[str, bytes]] = {}
    fault: ClassVar[str | None] = None
    requests: ClassVar[list[tuple[str, str | None]]] = []

    def do_GET(self) -> None:
        body = self.files.get(self.path.lstrip("/"))
        asked = self.headers.get("Range")
        self.requests.append((self.path, asked))
        if body is None:
            self.send_error(404)
            return
        start = int(re.fullmatch(r"bytes=(\d+)-", asked).group(1)) if asked and self.fault != "no-ranges" else 0
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        part = body[start:]
        self.wfile.write(part[: len(part) // 2] if self.fault == "truncate" else part)
        if self.fault == "truncate":
            self.wfile.flush()
            self.close_connection = True

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def mirror():
    Mirror.files, Mirror.fault, Mirror.requests = {}, None, []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Mirror)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture
def pins(tmp_path, monkeypatch) -> list[PublicModel]:
    """Small stand-ins for the three public files, pinned as the real ones are, served by the mirror."""
    package = next(demo.write_demucs(tmp_path / "package", size="tiny", seed=7).glob("*.th"))
    rng = np.random.default_rng(0)
    stand_ins = {"hubert": rng.bytes(300_000), "rmvpe": rng.bytes(200_000), "htdemucs": package.read_bytes()}
    stand_ins["fcpe"] = rng.bytes(100_000)
    models = []
    for real in PUBLIC_MODELS:
        body = stand_ins[real.name]
        path = real.path if real.name != "htdemucs" else f"separation/{package.name}"
        pinned = {"path": path, "size": len(body), "sha256": hashlib.sha256(body).hexdigest()}
        served = body
        if real.member:  # a wheel holding the file, served under the wheel's own name
            wheel = tmp_path / "stand-in.whl"
            with zipfile.ZipFile(wheel, "w") as archive:
                archive.writestr("torchfcpe/__init__.py", "")
                archive.writestr(real.member, body)
            served = wheel.read_bytes()
            pinned.update(archive_size=len(served), archive_sha256=hashlib.sha256(served).hexdigest())
        models.append(real.model_copy(update=pinned))
        Mirror.files[real.url.rsplit("/", 1)[1] if real.member else path] = served
    monkeypatch.setattr(base_models, "PUBLIC_MODELS", tuple(models))
    return models


@pytest.fixture
def demo_store(tmp_path) -> ModelStore:
    """A store holding the random-weight demo separator and content encoder (what ``cover demo`` writes)."""
    store = ModelStore(tmp_path / "models")
    demo.write_demucs(store.separation_dir, size="tiny")
    demo.write_hubert(store.root / "base" / "hubert", size="tiny")
    return store


def _tree(store: ModelStore) -> dict[str, str]:
    return {
        p.relative_to(store.root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(store.root.rglob("*"))
        if p.is_file() and not p.relative_to(store.root).as_posix().startswith(".fetch/")
    }


def _policy() -> UrlPolicy:
    return UrlPolicy(allow_http=True, allow_networks=["127.0.0.1/32"])


def test_the_real_pins_name_public_https_locations_and_demucs_checksums():
    assert [m.name for m in PUBLIC_MODELS] == ["hubert", "rmvpe", "htdemucs", "fcpe"]
    hosts = ("https://huggingface.co/", "https://dl.fbaipublicfiles.com/", "https://files.pythonhosted.org/")
    for model in PUBLIC_MODELS:
        assert model.url.startswith(hosts)
        assert re.fullmatch(r"[0-9a-f]{64}", model.sha256) and model.size > 40_000_000
    fcpe = PUBLIC_MODELS[3]
    assert fcpe.optional and fcpe.member and re.fullmatch(r"[0-9a-f]{64}", fcpe.archive_sha256 or "")
    assert fcpe.sha256 == FCPE_SHA256  # the same pin the engine's loader documents
    htdemucs = PUBLIC_MODELS[2]
    checksum = Path(htdemucs.path).stem.split("-")[1]  # Demucs names a package SIG-CHECKSUM.th
    assert htdemucs.sha256.startswith(checksum) and htdemucs.url.endswith(Path(htdemucs.path).name)


def test_fetch_replaces_the_demo_models_and_the_separator_loads(mirror, pins, demo_store):
    from job.render.separate.loading import load_separator_model

    seen = []
    report = fetch_base_models(demo_store, _policy(), mirror=mirror, progress=lambda m, done, size: seen.append(m.name))
    assert report.fetched == ["hubert", "rmvpe", "htdemucs"] and report.unchanged == []
    tree = _tree(demo_store)
    for model in pins[:3]:
        assert tree[model.path] == model.sha256
    assert sorted(p.name for p in (demo_store.root / "base" / "hubert").iterdir()) == ["hubert_base.pt"]
    assert [p.name for p in demo_store.separation_dir.glob("*.th")] == [Path(pins[2].path).name]
    load_separator_model("htdemucs", demo_store)  # the bag file and the package, where Demucs looks
    assert not (demo_store.root / ".fetch").exists()
    assert set(seen) == {"hubert", "rmvpe", "htdemucs"}

    served = len(Mirror.requests)
    again = fetch_base_models(demo_store, _policy(), mirror=mirror)
    assert again.fetched == [] and again.unchanged == ["hubert", "rmvpe", "htdemucs"]
    assert len(Mirror.requests) == served  # nothing downloaded twice
    assert not (demo_store.root / "base" / "fcpe.pt").exists()  # optional: only when named


def test_fcpe_comes_out_of_its_wheel_checked_twice(mirror, pins, demo_store):
    """The wheel is checked against its pins, then the one member against its own."""
    fcpe = pins[3]
    report = fetch_base_models(demo_store, _policy(), names=["fcpe"], mirror=mirror)
    assert report.fetched == ["fcpe"] and _tree(demo_store)["base/fcpe.pt"] == fcpe.sha256
    assert not (demo_store.root / ".fetch").exists()  # the wheel is not kept
    (demo_store.root / "base" / "fcpe.pt").unlink()
    name = fcpe.url.rsplit("/", 1)[1]
    Mirror.files[name] = Mirror.files[name][:-1] + b"x"  # the wheel itself altered
    with pytest.raises(CoverError) as caught:
        fetch_base_models(demo_store, _policy(), names=["fcpe"], mirror=mirror)
    assert caught.value.code is ErrorCode.MODEL_HASH_MISMATCH and "archive" in caught.value.message
    assert "base/fcpe.pt" not in _tree(demo_store)


def test_a_file_that_does_not_match_its_pin_is_refused_and_deleted(mirror, pins, demo_store):
    before = _tree(demo_store)
    body = Mirror.files[pins[0].path]
    Mirror.files[pins[0].path] = bytes([body[0] ^ 1]) + body[1:]  # one bit, same size
    with pytest.raises(CoverError) as caught:
        fetch_base_models(demo_store, _policy(), names=["hubert"], mirror=mirror)
    assert caught.value.code is ErrorCode.MODEL_HASH_MISMATCH and "nothing was installed" in caught.value.message
    assert _tree(demo_store) == before
    assert not [p for p in (demo_store.root / ".fetch").rglob("*") if p.is_file()]  # nothing kept to resume


def test_a_download_that_breaks_off_installs_nothing_and_resumes(mirror, pins, demo_store):
    before = _tree(demo_store)
    Mirror.fault = "truncate"
    with pytest.raises(CoverError) as caught:
        fetch_base_models(demo_store, _policy(), names=["rmvpe"], mirror=mirror)
    assert caught.value.code is ErrorCode.INPUT_DOWNLOAD_FAILED and caught.value.retryable
    assert "run it again to continue" in caught.value.message
    assert _tree(demo_store) == before
    size = pins[1].size
    Mirror.fault = None
    fetch_base_models(demo_store, _policy(), names=["rmvpe"], mirror=mirror)
    assert _tree(demo_store)["base/rmvpe.pt"] == pins[1].sha256
    assert Mirror.requests[-1] == (f"/{pins[1].path}", f"bytes={size // 2}-")  # the second half only


def test_a_server_that_ignores_the_range_sends_the_whole_file_again(mirror, pins, demo_store):
    Mirror.fault = "truncate"
    with pytest.raises(CoverError):
        fetch_base_models(demo_store, _policy(), names=["rmvpe"], mirror=mirror)
    Mirror.fault = "no-ranges"
    fetch_base_models(demo_store, _policy(), names=["rmvpe"], mirror=mirror)
    assert _tree(demo_store)["base/rmvpe.pt"] == pins[1].sha256


def test_the_url_guard_still_applies(mirror, pins, demo_store):
    """Without the development setting the loopback mirror is refused before any connection."""
    with pytest.raises(CoverError) as caught:
        fetch_base_models(demo_store, UrlPolicy(allow_http=True), names=["rmvpe"], mirror=mirror)
    assert caught.value.code is ErrorCode.INPUT_URL_REFUSED
    assert Mirror.requests == []


def test_the_command_shows_progress_and_says_what_it_did(mirror, pins, demo_store):
    env = {
        "COVER_MODELS_DIR": str(demo_store.root),
        "COVER_MODELS_MIRROR": mirror,
        "COVER_ALLOW_HTTP_URLS": "true",
        "COVER_URL_ALLOW_NETWORKS": '["127.0.0.1/32"]',
    }
    from job.cli.main import main

    done = run_main(main, ["models", "fetch", "rmvpe", "htdemucs"], env)
    assert done.returncode == 0, done.stderr
    assert "base models fetched: rmvpe, htdemucs; already in the store: none" in done.stdout
    assert "rmvpe" in done.stderr and "htdemucs" in done.stderr and "B/s" in done.stderr  # byte progress
    wrong = run_main(main, ["models", "fetch", "wav2vec"], env)
    assert wrong.returncode != 0 and "no base model wav2vec (known: hubert, rmvpe, htdemucs, fcpe)" in wrong.stderr


def test_the_readme_s_first_real_cover_in_three_commands(mirror, store, song, tmp_path, monkeypatch):
    """The README's three commands, as written, on a fresh store: the base models fetched (stand-ins
    in the real formats: fairseq's hubert_base.pt, rmvpe.pt, a Demucs package), a voice added from
    a URL, a cover made. Two things differ from a user's machine, both in the environment: the
    mirror (``COVER_MODELS_MIRROR``) and the voice's host (example.org is the README's placeholder,
    served here from loopback); the random-weight stand-ins are measured, not gated."""
    from fairseq_hubert import write_fairseq_hubert
    from safetensors.torch import load_file

    from job.cli.main import main
    from job.render.media import ffmpeg

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = readme[readme.index("a first real cover is three commands") :]
    block = block[block.index("```sh\n") + 6 : block.index("```", block.index("```sh\n") + 6)]
    commands = [line.split("#")[0].split() for line in block.splitlines()]
    assert [c[:2] for c in commands] == [["cover", "models"], ["cover", "models"], ["cover", "make"]]

    hubert = write_fairseq_hubert(tmp_path / "hubert_base.pt", load_file(store / "base/hubert/model.safetensors"), 12)
    package = next((store / "separation").glob("*.th"))
    bodies = {"hubert": hubert.read_bytes(), "rmvpe": (store / "base/rmvpe.pt").read_bytes()}
    bodies["htdemucs"] = package.read_bytes()
    pins = []
    for real in PUBLIC_MODELS:
        if real.optional:  # not in the README's three commands
            continue
        path = real.path if real.name != "htdemucs" else f"separation/{package.name}"
        body = bodies[real.name]
        pins.append(
            real.model_copy(update={"path": path, "size": len(body), "sha256": hashlib.sha256(body).hexdigest()})
        )
        Mirror.files[path] = body
    monkeypatch.setattr(base_models, "PUBLIC_MODELS", tuple(pins))
    with zipfile.ZipFile(tmp_path / "voice.zip", "w") as archive:
        for file in ("model.pth", "model.index"):
            if (store / "voices/demo-voice" / file).is_file():
                archive.write(store / "voices/demo-voice" / file, f"singer/{file}")
    Mirror.files["voice.zip"] = (tmp_path / "voice.zip").read_bytes()
    user = tmp_path / "user"
    user.mkdir()
    ffmpeg.run([*ffmpeg.input_args(song), "-b:a", "128k", "-y", str(user / "song.mp3")])
    monkeypatch.chdir(user)
    env = {
        "HOME": str(user),
        "PATH": os.environ["PATH"],
        "COVER_MODELS_DIR": str(user / "models"),
        "COVER_WORK_DIR": str(user / "work"),
        "COVER_STEM_CACHE_DIR": str(user / "stems"),
        "COVER_MODELS_MIRROR": mirror,
        "COVER_ALLOW_HTTP_URLS": "true",
        "COVER_URL_ALLOW_NETWORKS": '["127.0.0.1/32"]',
        "COVER_QUALITY": "measure",
        "COVER_REPAIR_BUDGET": "0",
    }
    for command in commands:
        argv = [word.replace("https://example.org", mirror) for word in command[1:]]
        done = run_main(main, argv, env)
        assert done.returncode == 0, f"{' '.join(command)}: {done.stderr[-2000:]}"
    assert sorted(p.name for p in (user / "models/base/hubert").iterdir()) == ["hubert_base.pt"]
    assert ffmpeg.probe(user / "cover.mp3", "cover")["stream"]["codec_name"] == "mp3"
