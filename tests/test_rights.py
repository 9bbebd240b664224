"""Voice rights records: written by `cover models add`, required where a deployment says so
(COVER_REQUIRE_RIGHTS; the service's refusals are in tests/test_service.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from job.devkit import demo
from shared.voices import DEMO_RIGHTS, VOICE_FILE, VoiceInfo
from tests.conftest import run_cover
from tests.test_vocal_split import linked_store

RECORD = {
    "voice_of": "Ada Example",
    "consented_by": "Ada Example",
    "consented_on": "2026-11-30",
    "terms": "CC-BY-4.0",
    "evidence": "contracts/ada-2026-11.pdf",
    "restrictions": ["no commercial use"],
}


def _source(tmp_path: Path) -> Path:
    demo.write_voice(tmp_path / "src", name="ada", size="tiny")
    return tmp_path / "src"


def test_models_add_writes_the_rights_record_from_flags_or_a_file(tmp_path):
    env = {**os.environ, "COVER_MODELS_DIR": str(tmp_path / "models")}
    flags = ["--voice-of", "Ada Example", "--consented-by", "Ada Example", "--consented-on", "2026-11-30"]
    flags += ["--terms", "CC-BY-4.0", "--evidence", "contracts/ada-2026-11.pdf", "--restriction", "no commercial use"]
    done = run_cover(["models", "add", str(_source(tmp_path)), "--name", "ada", *flags, "--json"], env)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["rights"] == RECORD
    stored = VoiceInfo.model_validate_json((tmp_path / "models/voices/ada" / VOICE_FILE).read_text())
    assert stored.rights is not None and stored.rights.model_dump(mode="json") == RECORD
    record = tmp_path / "rights.json"
    record.write_text(json.dumps(RECORD))
    again = run_cover(
        ["models", "add", str(_source(tmp_path)), "--name", "bea", "--rights", str(record), "--json"], env
    )
    assert again.returncode == 0 and json.loads(again.stdout)["rights"] == RECORD
    listed = run_cover(["models", "list", "--json"], env)
    assert [v["rights"]["terms"] for v in json.loads(listed.stdout)] == ["CC-BY-4.0", "CC-BY-4.0"]


def test_a_bad_rights_record_is_refused_in_its_own_words_and_nothing_is_added(tmp_path):
    env = {**os.environ, "COVER_MODELS_DIR": str(tmp_path / "models")}
    record = tmp_path / "rights.json"
    record.write_text(json.dumps(RECORD))
    for extra, said in [
        (["--voice-of", "Ada", "--consented-by", "Ada", "--terms", "x", "--consented-on", "last week"], "consented_on"),
        (["--voice-of", "Ada"], "consented_by"),
        (["--rights", str(record), "--voice-of", "Ada"], "not both"),
    ]:
        done = run_cover(["models", "add", str(_source(tmp_path)), "--name", "ada", *extra], env)
        assert done.returncode == 3 and said in done.stderr, (extra, done.stderr)
        assert not (tmp_path / "models/voices/ada").exists()


def test_under_the_policy_a_voice_without_a_record_renders_nothing_and_the_demo_voice_has_one(
    store, env, song, tmp_path
):
    root = linked_store(store, tmp_path / "models")
    demo.write_voice(root / "voices" / "plain", name="plain", size="tiny")
    info = VoiceInfo.model_validate_json((root / "voices/plain" / VOICE_FILE).read_text())
    (root / "voices/plain" / VOICE_FILE).write_text(info.model_copy(update={"rights": None}).model_dump_json())
    env = {**env, "COVER_MODELS_DIR": str(root), "COVER_REQUIRE_RIGHTS": "true"}
    out = tmp_path / "cover.wav"
    done = run_cover(["make", str(song), "--voice", "plain", "-o", str(out)], env)
    assert done.returncode == 3 and "[voice.no_rights]" in done.stderr and "--voice-of" in done.stderr
    assert not out.exists()
    duet = run_cover(["make", str(song), "--voice", demo.DEMO_VOICE, "--voice", "plain@1-2", "-o", str(out)], env)
    assert duet.returncode == 3 and "voice plain has no rights record" in duet.stderr
    assert (
        VoiceInfo.model_validate_json((store / "voices" / demo.DEMO_VOICE / VOICE_FILE).read_text()).rights
        == DEMO_RIGHTS
    )
