"""Hostile input, written as the attacks: each refused with its stable code, nothing written outside
its place, nothing run. Network: loopback only; guards against other addresses are tested by their
refusal before any connection (an IP literal needs no name lookup, ``localhost`` comes from
/etc/hosts)."""

from __future__ import annotations

import http.server
import json
import posixpath
import re
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from job.devkit import demo
from job.render.fetch import fetch
from job.render.media.download import UrlPolicy, download
from shared.errors import CoverError, ErrorCode
from shared.events import parse_request
from shared.model_store import ModelStore
from shared.names import FILE_NAME_PATTERN, printable, safe_file_name
from shared.storage import Keys, LocalStorage
from tests.conftest import run_cover

LOOPBACK_OK = UrlPolicy.model_validate({"allow_http": True, "allow_networks": ["127.0.0.1/32"]})  # the test servers


def code_of(call) -> ErrorCode:
    with pytest.raises(CoverError) as info:
        call()
    return info.value.code


# --- identifiers --------------------------------------------------------------------------------

TRAVERSALS = [
    "x/../../covers/abc.mp3",
    "../manifests/x.json",
    "a//b",
    "/etc/passwd",
    "a/./b",
    "a/",
    ".hidden",
    "a\\..\\b",
    "songs/%2e%2e/x",
    "a\x00b",
    "é",
    "x" * 201,
    "",
]


@pytest.mark.parametrize("song_id", TRAVERSALS)
def test_a_song_id_that_could_leave_its_prefix_is_refused(song_id):
    body = json.dumps({"song_id": song_id, "voice_model": "demo-voice"}).encode()
    assert code_of(lambda: parse_request(body)) is ErrorCode.OPTIONS_INVALID


@pytest.mark.parametrize("voice", ["../x", "Demo-Voice", "a/b", "-x", "x" * 65])
def test_a_voice_name_that_is_not_a_slug_is_refused(voice):
    body = json.dumps({"song_id": "song-1", "voice_model": voice}).encode()
    assert code_of(lambda: parse_request(body)) is ErrorCode.OPTIONS_INVALID


@settings(max_examples=300, deadline=None)
@given(st.text(min_size=1, max_size=80))
def test_every_accepted_song_id_stays_under_songs(song_id):
    """Property of the request parser and the key builder: whatever parses names a key that is its
    own normal form, under ``songs/``."""
    try:
        request = parse_request(json.dumps({"song_id": song_id, "voice_model": "v"}).encode())
    except CoverError as exc:
        assert exc.code is ErrorCode.OPTIONS_INVALID  # noqa: PT017 - a property test: most inputs are refused
        return
    key = Keys().song(request.song_id)
    assert key.startswith("songs/") and posixpath.normpath(key) == key and ".." not in key.split("/")


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=120))
def test_any_outside_file_name_becomes_a_base_name(name):
    safe = safe_file_name(name, "default")
    assert re.match(FILE_NAME_PATTERN, safe) and "/" not in safe and safe not in (".", "..")


@pytest.mark.parametrize(
    ("options", "what"),
    [
        ({"pitch": 25}, "pitch"),
        ({"pitch": -25}, "pitch"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**32}, "seed"),
        ({"speaker": 5000}, "speaker"),
        ({"index_rate": 2}, "index_rate"),
        ({"pitch": "high"}, "pitch"),
    ],
)
def test_numeric_options_are_bounded_in_the_schema(options, what):
    body = json.dumps({"song_id": "s", "voice_model": "v", "options": options}).encode()
    with pytest.raises(CoverError) as info:
        parse_request(body)
    assert info.value.code is ErrorCode.OPTIONS_INVALID and what in info.value.message


def test_a_speaker_beyond_the_voice_is_refused_when_the_request_is_resolved(tmp_path):
    from shared.covers import resolve

    bucket = LocalStorage(tmp_path / "bucket")
    bucket.put_bytes("songs/s", b"x")
    info = demo.write_voice(tmp_path / "models" / "voices" / "v", name="v", size="tiny")
    assert info.speakers == 4  # the tiny config's speaker embedding
    request = parse_request(json.dumps({"song_id": "s", "voice_model": "v", "options": {"speaker": 4}}).encode())
    assert (
        code_of(lambda: resolve(bucket, Keys(), ModelStore(tmp_path / "models"), request)) is ErrorCode.OPTIONS_INVALID
    )


# --- voice files from the bucket ------------------------------------------------------------------


@pytest.mark.parametrize("escaping", ["../../escape.txt", "/abs/escape.txt", "..", "sub/escape.txt"])
def test_a_bucket_voice_json_naming_an_escaping_file_is_refused_and_writes_nothing(tmp_path, escaping):
    bucket = LocalStorage(tmp_path / "bucket")
    digest = {"sha256": "0" * 64, "size": 3}
    evil = {
        "name": "evil",
        "display_name": "Evil",
        "rvc_version": "v2",
        "sample_rate": 48000,
        "f0": True,
        "has_index": False,
        "files": {"model.pth": digest, escaping: digest},
    }
    bucket.put_bytes(Keys.voice("evil", "voice.json"), json.dumps(evil).encode())
    bucket.put_bytes(Keys.voice("evil", "model.pth"), b"abc", "application/octet-stream")
    bucket.put_bytes(Keys.voice("evil", escaping.lstrip("/")) if ".." not in escaping else "voices/x", b"pwn")
    models = ModelStore(tmp_path / "runner" / "models", bucket)
    assert code_of(lambda: models.voice("evil")) is ErrorCode.MODEL_CORRUPT
    written = [p for p in tmp_path.rglob("*") if p.is_file() and "bucket" not in p.parts]
    assert written == []  # nothing staged, nothing escaped


def test_a_zip_entry_that_climbs_out_lands_inside(env, tmp_path):
    import zipfile

    demo.write_voice(tmp_path / "src", name="x", size="tiny")
    archive = tmp_path / "climb.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(tmp_path / "src" / "model.pth", "../../../../climbed.pth")
    own = tmp_path / "store"
    proc = run_cover(["models", "add", str(archive)], {**env, "COVER_MODELS_DIR": str(own)})
    assert proc.returncode == 0, proc.stderr
    assert not list(tmp_path.parent.rglob("climbed.pth"))  # placed inside the staging folder, then stored
    assert (own / "voices" / "climb" / "model.pth").is_file()


def test_control_characters_in_a_display_name_are_not_printed(env, tmp_path):
    own = tmp_path / "store"
    info = demo.write_voice(own / "voices" / "loud", name="loud", size="tiny")
    voice_json = own / "voices" / "loud" / "voice.json"
    voice_json.write_text(
        info.model_copy(update={"display_name": "Loud\x1b[2J\x1b]0;pwned\x07 voice"}).model_dump_json()
    )
    proc = run_cover(["models", "list"], {**env, "COVER_MODELS_DIR": str(own)})
    assert proc.returncode == 0 and "Loud" in proc.stdout and "\x1b" not in proc.stdout and "\x07" not in proc.stdout
    assert printable("a\tb\x1b[0m") == "ab[0m"


# --- media ----------------------------------------------------------------------------------------


def _tone(path: Path, seconds: float = 3.0) -> Path:
    subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i", f"sine=f=440:d={seconds}", str(path)], check=True)
    return path


@pytest.mark.parametrize(
    "playlist",
    [
        "#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\nsecret.wav\n#EXT-X-ENDLIST\n",
        "#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\nfile:{secret}\n#EXT-X-ENDLIST\n",
        "ffconcat version 1.0\nfile secret.wav\n",
    ],
)
def test_a_song_that_is_a_playlist_naming_a_local_file_is_refused(tmp_path, playlist):
    secret = _tone(tmp_path / "secret.wav")
    song = tmp_path / "song.mp3"
    song.write_text(playlist.format(secret=secret))
    assert code_of(lambda: fetch(song, tmp_path / "work")) is ErrorCode.INPUT_NOT_AUDIO
    assert not (tmp_path / "work" / "song.wav").exists()


def test_a_song_a_few_samples_long_is_too_short(tmp_path):
    subprocess.run(
        ["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "sine=f=440:d=0.001", str(tmp_path / "blip.wav")], check=True
    )
    assert code_of(lambda: fetch(tmp_path / "blip.wav", tmp_path / "w")) is ErrorCode.INPUT_TOO_SHORT


# --- URLs -----------------------------------------------------------------------------------------


class _Server:
    """A loopback HTTP server that records what it was asked; ``routes`` maps a path to a handler."""

    def __init__(self, routes):
        seen = self.seen = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                seen.append(self.path)
                routes.get(self.path.split("?")[0], lambda h: h.send_error(404))(self)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()


@pytest.fixture
def server():
    def redirect(target):
        def handle(h):
            h.send_response(302)
            h.send_header("Location", target)
            h.end_headers()

        return handle

    def trickle(h):
        h.send_response(200)
        h.send_header("Content-Length", "1000")
        h.end_headers()
        try:
            for _ in range(1000):
                h.wfile.write(b"x")
                h.wfile.flush()
                time.sleep(0.5)
        except (BrokenPipeError, ConnectionResetError):
            return  # the client gave up on the trickle, as it must: not an error of this server

    def ok(h):
        h.send_response(200)
        h.send_header("Content-Length", "5")
        h.end_headers()
        h.wfile.write(b"hello")

    def short(h):  # announces 1000 bytes, sends 10 and hangs up
        h.send_response(200)
        h.send_header("Content-Length", "1000")
        h.end_headers()
        h.wfile.write(b"x" * 10)
        h.close_connection = True

    def stall(h):  # sends 10 bytes, then nothing
        h.send_response(200)
        h.send_header("Content-Length", "1000")
        h.end_headers()
        h.wfile.write(b"x" * 10)
        h.wfile.flush()
        time.sleep(5)

    srv = _Server(
        {
            "/ok": ok,
            "/trickle": trickle,
            "/short": short,
            "/stall": stall,
            "/to-metadata": redirect("http://169.254.169.254/latest/meta-data/"),
            "/to-private": redirect("http://10.1.2.3/x"),
            "/to-loopback6": redirect("http://[::1]:9/x"),
            "/to-ok": redirect("/ok"),
        }
    )
    yield srv
    srv.close()


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:{port}/ok",
        "http://localhost:{port}/ok",
        "http://[::1]:{port}/ok",
        "http://[::ffff:127.0.0.1]:{port}/ok",
        "https://127.0.0.1:{port}/ok",
    ],
)
def test_loopback_urls_are_refused_before_connecting(server, tmp_path, url):
    target = url.format(port=server.port)
    assert code_of(lambda: download(target, tmp_path / "f", UrlPolicy(allow_http=True))) is ErrorCode.INPUT_URL_REFUSED
    assert server.seen == [] and not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data/",
        "https://[fd00:ec2::254]/",
        "https://10.0.0.1/x",
        "https://192.168.1.1/x",
        "https://172.16.0.1/x",
        "https://[fe80::1]/x",
        "https://224.0.0.1/x",
        "https://0.0.0.0/x",
        "https://[::]/x",
        "ftp://1.1.1.1/x",
        "file:///etc/passwd",
        "gopher://1.1.1.1/",
        "https://user:pw@1.1.1.1/x",
        "http://1.1.1.1/plain-http-not-allowed",
    ],
)
def test_private_metadata_and_odd_scheme_urls_are_refused_by_classification(tmp_path, url):
    """Refused before any socket exists: these addresses are never contacted, not even to prove it."""
    assert code_of(lambda: download(url, tmp_path / "f", UrlPolicy())) is ErrorCode.INPUT_URL_REFUSED


def test_the_metadata_address_stays_refused_when_its_network_is_allowed(tmp_path):
    policy = UrlPolicy.model_validate({"allow_http": True, "allow_networks": ["169.254.0.0/16", "fd00::/8"]})
    for url in ("http://169.254.169.254/latest/meta-data/", "http://[fd00:ec2::254]/"):
        assert code_of(lambda u=url: download(u, tmp_path / "f", policy)) is ErrorCode.INPUT_URL_REFUSED


@pytest.mark.parametrize("path", ["/to-metadata", "/to-private", "/to-loopback6"])
def test_each_redirect_hop_is_checked_again(server, tmp_path, path):
    """The first hop is the allowed test server; where it redirects is not allowed, and is refused
    before any connection to it."""
    code = code_of(lambda: download(f"http://127.0.0.1:{server.port}{path}", tmp_path / "f", LOOPBACK_OK))
    assert code is ErrorCode.INPUT_URL_REFUSED and server.seen == [path]
    assert not list(tmp_path.iterdir())


def test_redirects_within_the_rules_are_followed(server, tmp_path):
    got = download(f"http://127.0.0.1:{server.port}/to-ok?token=secret", tmp_path / "f", LOOPBACK_OK)
    assert got.read_bytes() == b"hello" and server.seen == ["/to-ok?token=secret", "/ok"]


def test_a_server_trickling_bytes_is_cut_off_at_the_deadline(server, tmp_path):
    policy = LOOPBACK_OK.model_copy(update={"deadline_s": 2.0})
    with pytest.raises(CoverError) as info:
        download(f"http://127.0.0.1:{server.port}/trickle?token=secret", tmp_path / "f", policy)
    # the deadline ended it (the trickle never stalls long enough for a read timeout)
    assert info.value.code is ErrorCode.INPUT_DOWNLOAD_FAILED and "did not finish within 2 s" in info.value.message
    assert "secret" not in info.value.message  # no query strings in messages
    assert not list(tmp_path.iterdir())  # no partial file


def test_a_download_over_the_size_limit_stops(server, tmp_path):
    policy = LOOPBACK_OK.model_copy(update={"max_bytes": 3})
    assert (
        code_of(lambda: download(f"http://127.0.0.1:{server.port}/ok", tmp_path / "f", policy))
        is ErrorCode.INPUT_TOO_LONG
    )
    assert not list(tmp_path.iterdir())


# --- model files ------------------------------------------------------------------------------------


def _voice_file(tmp_path: Path, **changes) -> Path:
    """A tiny real v2 voice with ``changes`` applied to its raw checkpoint dict."""
    import torch

    demo.write_voice(tmp_path / "v", name="v", size="tiny", with_index=False)
    raw = torch.load(tmp_path / "v" / "model.pth", weights_only=True)
    for key, change in changes.items():
        raw[key] = change(raw[key])
    torch.save(raw, tmp_path / "evil.pth")
    return tmp_path / "evil.pth"


def _load_voice(path: Path) -> None:
    from job.render.rvc.checkpoint import build_synthesizer, read_checkpoint

    build_synthesizer(read_checkpoint(path), path.name)


@pytest.mark.parametrize(("field", "value"), [(3, 1_000_000), (6, 10_000), (13, 2**20), (12, [64] * 20), (16, 10**9)])
def test_a_voice_declaring_an_oversized_architecture_is_corrupt_before_any_allocation(
    tmp_path, monkeypatch, field, value
):
    def declare(config):
        config = list(config)
        config[field] = value
        return config

    from job.render.rvc import synthesizer

    path = _voice_file(tmp_path, config=declare)
    built: list[object] = []
    real_init = synthesizer.Synthesizer.__init__

    def counted(self, *args, **kwargs):
        built.append(args)
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(synthesizer.Synthesizer, "__init__", counted)
    assert code_of(lambda: _load_voice(path)) is ErrorCode.MODEL_CORRUPT
    assert built == []  # refused from its declared sizes, before any network (or its tensors) was built


def test_a_tensor_view_declaring_gigabytes_over_one_float_is_corrupt(tmp_path):
    import torch

    def inflate(weight):
        weight["enc_p.emb_phone.weight"] = torch.zeros(1).expand(100_000, 100_000)  # 40 GB declared, 4 bytes held
        return weight

    assert code_of(lambda: _load_voice(_voice_file(tmp_path, weight=inflate))) is ErrorCode.MODEL_CORRUPT


def test_an_index_declaring_more_vectors_than_its_file_holds_is_corrupt(tmp_path):
    import struct

    from job.render.rvc.retrieval import FeatureIndex

    demo.write_voice(tmp_path / "v", name="v", size="tiny")
    data = bytearray((tmp_path / "v" / "model.index").read_bytes())
    struct.pack_into("<q", data, 8, 10**12)  # ntotal: a trillion vectors
    (tmp_path / "huge.index").write_bytes(bytes(data))
    assert code_of(lambda: FeatureIndex.load(tmp_path / "huge.index")) is ErrorCode.MODEL_CORRUPT


def _ivf_offsets(data: bytes) -> dict[str, int]:
    """Where an IVF-Flat index's inner lengths sit (faiss' layout; see retrieval.check_layout)."""
    import struct

    dim = struct.unpack_from("<i", data, 4)[0]
    nlist = struct.unpack_from("<Q", data, 37)[0]
    quantizer_size = 53 + 37  # IxF2 and its header
    direct_map = quantizer_size + 8 + nlist * dim * 4 + 1
    sizes = direct_map + 8 + 4 + 8 + 8 + 4  # the map's length, ilar, nlist, code size, full
    return {"quantizer": quantizer_size, "direct map": direct_map, "list sizes": sizes, "first list": sizes + 8}


@pytest.mark.parametrize("where", ["quantizer", "direct map", "list sizes", "first list"])
def test_an_index_whose_inner_lengths_lie_is_corrupt_before_faiss_reads_it(tmp_path, where):
    """The outer header honest, one inner length a lie (the quantizer's vector count, the direct
    map's, the count of list sizes, one list's size): faiss would allocate what it claims (a 6 MB
    file once took gigabytes); the layout check refuses it first."""
    import struct

    from job.render.rvc.retrieval import FeatureIndex

    demo.write_voice(tmp_path / "v", name="v", size="tiny")
    data = bytearray((tmp_path / "v" / "model.index").read_bytes())
    struct.pack_into("<Q", data, _ivf_offsets(bytes(data))[where], 2**40)
    (tmp_path / "lying.index").write_bytes(bytes(data))
    started = time.monotonic()
    with pytest.raises(CoverError) as caught:
        FeatureIndex.load(tmp_path / "lying.index")
    assert caught.value.code is ErrorCode.MODEL_CORRUPT and "lying.index: " in caught.value.message
    assert time.monotonic() - started < 2


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_fuzzed_indexes_load_or_fail_as_corrupt(tmp_path_factory, data):
    """Eight bytes of a real index overwritten anywhere in its structure: it loads, or it is
    ``model.corrupt``; never another error, never an allocation past the file."""
    import struct

    from job.render.rvc.retrieval import FeatureIndex

    folder = tmp_path_factory.mktemp("index")
    demo.write_voice(folder / "v", name="v", size="tiny")
    original = (folder / "v" / "model.index").read_bytes()
    mutated = bytearray(original)
    structure = _ivf_offsets(original)["first list"]  # everything before the first list's codes
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, structure))
        struct.pack_into("<Q", mutated, at, data.draw(st.integers(0, 2**64 - 1)))
    (folder / "fuzzed.index").write_bytes(bytes(mutated))
    code = None
    try:
        FeatureIndex.load(folder / "fuzzed.index")
    except CoverError as error:
        code = error.code
    assert code in (None, ErrorCode.MODEL_CORRUPT)


def test_a_demucs_package_declaring_more_than_it_holds_is_corrupt(tmp_path):
    import torch

    from job.render.safe_load import load_with_inert_objects
    from job.render.separate.loading import _demucs_classes, load_package

    demo.write_demucs(tmp_path / "sep", size="tiny")
    original = next((tmp_path / "sep").glob("*.th"))
    package = load_with_inert_objects(original, allowed=_demucs_classes())
    deep = {"depth": 12_000}, {"t_layers": 5_000}, {"dconv_depth": 20_000}  # each once cost minutes to build
    for change in ({"channels": 1_000_000}, {"channels": 8}, *deep):
        torch.save({**package, "kwargs": {**package["kwargs"], **change}}, tmp_path / "evil.th")
        started = time.monotonic()
        assert code_of(lambda: load_package(tmp_path / "evil.th")) is ErrorCode.MODEL_CORRUPT, change
        assert time.monotonic() - started < 10, change  # refused before anything is built


@settings(max_examples=25, deadline=None)
@given(st.data())
def test_fuzzed_voice_files_fail_only_with_model_codes(tmp_path_factory, data):
    """Coverage-style fuzzing of the model importer: truncations and byte flips of a real voice."""
    tmp = tmp_path_factory.mktemp("fuzz")
    demo.write_voice(tmp / "v", name="v", size="tiny", with_index=False)
    raw = bytearray((tmp / "v" / "model.pth").read_bytes())
    cut = data.draw(st.integers(1, len(raw)))
    flips = data.draw(st.lists(st.tuples(st.integers(0, len(raw) - 1), st.integers(0, 255)), max_size=8))
    for position, value in flips:
        raw[position] = value
    (tmp / "fuzzed.pth").write_bytes(bytes(raw[:cut]))
    try:
        _load_voice(tmp / "fuzzed.pth")
    except CoverError as exc:
        assert exc.code.value.startswith("model.")  # noqa: PT017 - fuzzing: any model.* code is an answer


@settings(max_examples=30, deadline=None)
@given(st.data())
def test_fuzzed_voice_zips_fail_only_with_model_codes(tmp_path_factory, data):
    """The zip reader under fuzzing: a voice as the community shares it (a .pth and an .index in a
    folder), its archive's bytes cut and flipped anywhere (local headers, the central directory,
    the compressed streams): ``cover models add`` stores it, or answers with a model.* code, and
    leaves nothing staged."""
    import zipfile

    from job.cli.voices import add_voice

    tmp = tmp_path_factory.mktemp("zipfuzz")
    demo.write_voice(tmp / "v", name="v", size="tiny")
    archive = tmp / "voice.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.write(tmp / "v" / "model.pth", "Singer/singer.pth")
        zf.write(tmp / "v" / "model.index", "Singer/added_IVF_Flat.index")
    raw = bytearray(archive.read_bytes())
    cut = data.draw(st.integers(1, len(raw)))
    for position, value in data.draw(
        st.lists(st.tuples(st.integers(0, len(raw) - 1), st.integers(0, 255)), min_size=1, max_size=8)
    ):
        raw[position] = value
    (tmp / "fuzzed.zip").write_bytes(bytes(raw[:cut]))
    store = ModelStore(tmp / "store")
    try:
        add_voice(store, str(tmp / "fuzzed.zip"), name="fuzzed")
    except CoverError as exc:
        assert exc.code.value.startswith("model."), exc  # noqa: PT017 - fuzzing: any model.* code is an answer
    assert not [p for p in store.voices_dir.iterdir() if p.name.startswith(".incoming-")]


@settings(max_examples=20, deadline=None)
@given(st.data())
def test_fuzzed_media_fails_only_with_input_codes(tmp_path_factory, data):
    """Fuzzing of the media probe and decoder: truncations and byte flips of a real mp3."""
    tmp = tmp_path_factory.mktemp("media")
    raw = bytearray(_tone(tmp / "tone.mp3", 1.5).read_bytes())
    cut = data.draw(st.integers(0, len(raw)))
    for position, value in data.draw(
        st.lists(st.tuples(st.integers(0, len(raw) - 1), st.integers(0, 255)), max_size=16)
    ):
        raw[position] = value
    (tmp / "fuzzed.mp3").write_bytes(bytes(raw[:cut]))
    try:
        fetch(tmp / "fuzzed.mp3", tmp / "work")
    except CoverError as exc:
        assert exc.code.value.startswith("input.")  # noqa: PT017 - fuzzing: any input.* code is an answer


def test_the_s3_secret_never_shows_in_a_repr():
    from shared.settings import Settings

    settings = Settings(s3_secret_access_key="hunter2-secret", s3_access_key_id="AKIDEXAMPLE")
    assert "hunter2" not in repr(settings) and "hunter2" not in str(settings.model_dump())
    assert settings.s3_secret_access_key is not None
    assert settings.s3_secret_access_key.get_secret_value() == "hunter2-secret"


@pytest.mark.parametrize(
    "payload",
    [
        b"\x80\x02cposix\nsystem\nq\x00.",
        b"\x80\x04\x95\x05\x00\x00\x00\x00\x00\x00\x00\xff.",
        b"PK\x03\x04" + b"\x00" * 40,
    ],
)
def test_a_refused_checkpoint_never_advises_turning_safe_loading_off(tmp_path, payload):
    from job.render.safe_load import load_weights_only

    path = tmp_path / "odd.pth"
    path.write_bytes(payload)
    with pytest.raises(CoverError) as info:
        load_weights_only(path)
    assert info.value.code in (ErrorCode.MODEL_UNSAFE, ErrorCode.MODEL_CORRUPT)
    assert "weights_only" not in info.value.message and "trust the source" not in info.value.message


# --- round 2: every error path of an external byte ends in a stable code ---------------------------------


@pytest.mark.parametrize("path", ["/short", "/stall"])
def test_a_body_cut_short_or_stalled_is_a_failed_download(server, tmp_path, path):
    """urllib3's own errors (a body shorter than announced, a read that times out mid-body) are a
    failed download, retryable, and leave nothing behind; once they were ``internal``."""
    policy = LOOPBACK_OK.model_copy(update={"read_timeout_s": 1.0})
    with pytest.raises(CoverError) as info:
        download(f"http://127.0.0.1:{server.port}{path}", tmp_path / "song.mp3", policy)
    assert info.value.code is ErrorCode.INPUT_DOWNLOAD_FAILED and info.value.retryable
    assert list(tmp_path.iterdir()) == []


def _zip_with(entry_bytes: bytes, tmp_path: Path, flag: int = 0, method: int | None = None) -> Path:
    """A zip holding one ``model.pth`` whose headers are then edited: ``flag`` or-ed into the
    general-purpose flags (1: encrypted), ``method`` as its compression method (9: deflate64)."""
    import struct
    import zipfile

    archive = tmp_path / "voice.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("model.pth", entry_bytes)
    data = bytearray(archive.read_bytes())
    for signature, flag_at, method_at in ((b"PK\x03\x04", 6, 8), (b"PK\x01\x02", 8, 10)):
        at = data.index(signature)
        flags = struct.unpack_from("<H", data, at + flag_at)[0] | flag
        struct.pack_into("<H", data, at + flag_at, flags)
        if method is not None:
            struct.pack_into("<H", data, at + method_at, method)
    archive.write_bytes(bytes(data))
    return archive


@pytest.mark.parametrize(("flag", "method", "said"), [(1, None, "encrypted"), (0, 9, "deflate64")])
def test_a_voice_zip_python_cannot_unpack_is_corrupt(tmp_path, flag, method, said):
    from job.cli.voices import add_voice

    archive = _zip_with(b"x" * 1000, tmp_path, flag, method)
    store = ModelStore(tmp_path / "store")
    with pytest.raises(CoverError) as info:
        add_voice(store, str(archive))
    assert info.value.code is ErrorCode.MODEL_CORRUPT and "cannot be unpacked" in info.value.message, said
    assert [p.name for p in store.voices_dir.iterdir()] == []  # nothing staged stays


def _bucket_voice(tmp_path: Path, **changes) -> ModelStore:
    bucket = LocalStorage(tmp_path / "bucket")
    info = demo.write_voice(tmp_path / "src", name="v", size="tiny")
    document = {**info.model_dump(mode="json"), **changes}
    bucket.put_bytes(Keys.voice("v", "voice.json"), json.dumps(document).encode())
    for file in info.files:
        bucket.put_bytes(Keys.voice("v", file), (tmp_path / "src" / file).read_bytes())
    return ModelStore(tmp_path / "runner", bucket)


def test_a_bucket_voice_json_without_its_model_is_corrupt_not_retried(tmp_path):
    info = demo.write_voice(tmp_path / "probe", name="v", size="tiny")
    files = {k: v for k, v in info.model_dump(mode="json")["files"].items() if k != "model.pth"}
    models = _bucket_voice(tmp_path, files=files)
    with pytest.raises(CoverError) as caught:
        models.voice("v")
    assert caught.value.code is ErrorCode.MODEL_CORRUPT and not caught.value.retryable
    assert "model.pth" in caught.value.message


def test_a_voice_json_declaring_more_speakers_than_its_model_is_a_mismatch(tmp_path, converter):
    """voice.json says 8 speakers, the model holds 4: the request for speaker 5 passes the
    request's check against voice.json and is refused where the model loads, not retried as
    ``internal``; a speaker past the model's table asked of the engine directly is the caller's mistake."""
    from shared.options import ConversionOptions

    models = _bucket_voice(tmp_path, speakers=8)
    voice = models.voice("v")
    with pytest.raises(CoverError) as caught:
        converter.load_voice(voice)
    assert caught.value.code is ErrorCode.MODEL_MISMATCH and not caught.value.retryable
    honest = converter.load_voice_file(tmp_path / "src" / "model.pth")
    with pytest.raises(CoverError) as caught:
        converter.convert(np.zeros(16000, dtype=np.float32), 16000, honest, ConversionOptions(speaker=5))
    assert caught.value.code is ErrorCode.OPTIONS_INVALID and "out of range" in caught.value.message
