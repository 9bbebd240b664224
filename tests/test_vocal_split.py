"""Lead and backing, and the lead's room, through the whole pipeline: the store's MDX-Net models
are ONNX functions we know (a gain), so each stem's numbers can be checked against the vocal stem
it was split from. Tiny models, `pm` pitch, no quality stage: what is checked is where each stem
goes (converted, mixed back, dropped) and the stem cache."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from job.cli.separation_models import add_separation_model
from job.devkit import demo
from job.devkit import mdx as devkit
from job.render.media.audio import MIX_SAMPLE_RATE, read_wav, write_wav
from job.render.media.download import UrlPolicy
from job.render.pipeline import CoverOptions, Pipeline
from job.render.separate.mdx import MdxModel
from job.render.separate.mdx_params import MdxKind
from job.render.separate.stems import StemCache
from job.render.separate.vocal_split import VocalSplitter, VocalStems
from shared.errors import CoverError, ErrorCode
from shared.model_store import ModelStore
from shared.options import BackingMode, ConversionOptions, MixOptions, OutputFormat, StemOptions
from shared.settings import Settings
from shared.storage import LocalStorage
from tests.conftest import run_cover

DIMS = (1025, 16)  # every bin of n_fft 2048, 16 frames: the gain models are exact


def linked_store(store: Path, root: Path) -> Path:
    """A store of the session's tiny models (linked, not copied) with a separation/mdx/ of its own."""
    (root / "separation" / "mdx").mkdir(parents=True)
    (root / "voices").mkdir()
    for item in (store / "separation").iterdir():
        (root / "separation" / item.name).symlink_to(item)
    (root / "base").symlink_to(store / "base")
    for voice in (store / "voices").iterdir():
        (root / "voices" / voice.name).symlink_to(voice)
    return root


def add_gain_model(root: Path, kind: MdxKind, gain: float, primary: str, scratch: Path) -> None:
    path = devkit.write_affine(scratch / f"{kind.value}.onnx", *DIMS, gain=gain)
    params = f"n_fft=2048,dim_f={DIMS[0]},dim_t={DIMS[1]},compensate=1.0,primary={primary}"
    add_separation_model(ModelStore(root), str(path), kind, params, replace=False, policy=UrlPolicy())


@pytest.fixture
def split_store(store, tmp_path) -> Path:
    root = linked_store(store, tmp_path / "models")
    add_gain_model(root, MdxKind.KARAOKE, 0.5, "vocals", tmp_path)  # lead = vocals / 2, backing = the rest
    add_gain_model(root, MdxKind.DEREVERB, 0.25, "reverb", tmp_path)  # room = lead / 4, dry = the rest
    return root


def _render(root: Path, song: Path, tmp: Path, name: str, stems: StemOptions, cache: StemCache | None = None):
    settings = Settings(models_dir=root, work_dir=tmp / "work", device="cpu", quality="off", repair_budget=0)
    pipeline = Pipeline(settings, stem_cache=cache)
    options = CoverOptions(
        conversion=ConversionOptions(f0_method="pm"), mix=MixOptions(format=OutputFormat.WAV), stems=stems
    )
    work = tmp / f"w-{name}"
    options.allow_no_vocals = True  # the tiny random separator may hear no singing
    result = pipeline.render(song, pipeline.store.voice(demo.DEMO_VOICE), tmp / f"{name}.wav", options, work=work)
    return result, work


def _wav(path: Path) -> np.ndarray:
    return read_wav(path)[0]


def test_with_a_karaoke_model_the_backing_is_mixed_back_unconverted_by_default(split_store, song, tmp_path):
    result, work = _render(split_store, song, tmp_path, "original", StemOptions())
    stems = result.vocal_stems
    assert stems is not None and stems.backing_mode is BackingMode.ORIGINAL and stems.karaoke == "karaoke.onnx"
    vocals, instrumental = _wav(work / "stems" / "vocals.wav"), _wav(work / "stems" / "no_vocals.wav")
    assert np.max(np.abs(_wav(stems.lead) - 0.5 * vocals)) < 1e-4  # the voice converts the lead alone
    assert np.max(np.abs(_wav(work / "bed.wav") - (instrumental + 0.5 * vocals))) < 1e-4
    assert "backing original" in stems.said()


def test_backing_mute_drops_it_and_convert_sings_it_with_the_voice(split_store, song, tmp_path, monkeypatch):
    sung: list[str] = []
    convert = Pipeline.convert
    monkeypatch.setattr(
        Pipeline, "convert", lambda self, vocals, *a, **k: sung.append(vocals.name) or convert(self, vocals, *a, **k)
    )
    muted, work = _render(split_store, song, tmp_path, "mute", StemOptions(backing=BackingMode.MUTE))
    assert muted.vocal_stems is not None and muted.vocal_stems.backing_mode is BackingMode.MUTE
    assert not (work / "bed.wav").exists()  # the instrumental alone under the lead
    _, work = _render(split_store, song, tmp_path, "convert", StemOptions(backing=BackingMode.CONVERT))
    converted = _wav(work / "backing.converted.44k.wav")
    instrumental = _wav(work / "stems" / "no_vocals.wav")
    assert np.max(np.abs(_wav(work / "bed.wav") - (instrumental + converted))) < 1e-4
    assert sung == ["lead.wav", "lead.wav", "backing.wav"]  # (the tiny separator's quiet stems convert to silence)


def test_dereverb_converts_the_dry_lead_and_keep_room_mixes_the_room_back(split_store, song, tmp_path):
    result, work = _render(
        split_store, song, tmp_path, "dry", StemOptions(backing=BackingMode.MUTE, dereverb=True, keep_room=True)
    )
    stems = result.vocal_stems
    assert stems is not None and stems.dereverb == "dereverb.onnx" and stems.room is not None
    lead = 0.5 * _wav(work / "stems" / "vocals.wav")
    assert np.max(np.abs(_wav(stems.lead) - 0.75 * lead)) < 1e-4
    assert np.max(np.abs(_wav(work / "bed.wav") - (_wav(work / "stems" / "no_vocals.wav") + 0.25 * lead))) < 1e-4
    assert "reverb removed by dereverb.onnx; the room kept" in stems.said()


def test_split_stems_come_from_the_stem_cache_for_a_second_voice(split_store, song, tmp_path, monkeypatch):
    cache = StemCache(LocalStorage(tmp_path / "cache"))
    options = StemOptions(dereverb=True)
    first, _ = _render(split_store, song, tmp_path, "first", options, cache)
    assert first.vocal_stems is not None and not first.vocal_stems.cached

    def no_split(*args, **kwargs):
        raise AssertionError("split again")

    monkeypatch.setattr(MdxModel, "split", no_split)
    again, _ = _render(split_store, song, tmp_path, "again", options, cache)
    assert again.stems_cached and again.vocal_stems is not None and again.vocal_stems.cached
    assert np.array_equal(_wav(again.vocal_stems.lead), _wav(first.vocal_stems.lead))
    with pytest.raises(AssertionError, match="split again"):  # other settings: other stems
        _render(split_store, song, tmp_path, "denoised", options.model_copy(update={"stem_denoise": True}), cache)


def test_stems_split_on_torch_in_bf16_are_kept_apart_from_onnx_runtime_s(split_store, tmp_path):
    """What ran the passes is part of the split stems' cache key (the reference's keys are those
    it always had) and of what the report says."""
    cache = StemCache(LocalStorage(tmp_path / "cache"))
    noise = 0.2 * np.random.default_rng(0).standard_normal((2, MIX_SAMPLE_RATE))
    vocals = write_wav(tmp_path / "vocals.wav", noise.astype(np.float32), MIX_SAMPLE_RATE)
    store = ModelStore(split_store)

    def split(splitter: VocalSplitter, name: str) -> VocalStems:
        (tmp_path / name).mkdir()
        return splitter.split(vocals, "separation-key", "a" * 64, tmp_path / name, StemOptions(), cache)

    low = split(VocalSplitter(store, runtime="torch", precision="bf16"), "bf16")
    assert not low.cached and low.runtime == "torch-bf16" and low.said().endswith("run on torch-bf16")
    reference = split(VocalSplitter(store, runtime="onnxruntime"), "reference")
    assert not reference.cached and reference.runtime == "onnxruntime"
    assert np.max(np.abs(_wav(reference.lead) - 0.5 * noise)) < 1e-4
    assert split(VocalSplitter(store, runtime="onnxruntime"), "again").cached


def test_without_a_karaoke_model_the_whole_stem_is_the_lead_and_asking_for_a_backing_mode_says_what_is_missing(
    store, song, tmp_path
):
    root = linked_store(store, tmp_path / "bare")
    result, work = _render(root, song, tmp_path, "plain", StemOptions())
    assert result.vocal_stems is not None and result.vocal_stems.lead == work / "stems" / "vocals.wav"
    assert "converted together" in result.vocal_stems.said()
    with pytest.raises(CoverError) as missing:
        _render(root, song, tmp_path, "asked", StemOptions(backing=BackingMode.ORIGINAL))
    assert missing.value.code is ErrorCode.MODEL_MISSING
    assert "cover models add FILE.onnx --kind karaoke" in missing.value.message


def test_cover_make_sings_a_duet_over_the_split_stems_and_its_report_shows_both(split_store, song, env, tmp_path):
    """The command line as a user types it: two voices, the backing converted by the second one;
    the report page has the stems' players and the duet's timeline."""
    demo.write_voice(split_store / "voices" / "demo-b", name="demo-b", size="tiny", seed=7)
    env = {**env, "COVER_MODELS_DIR": str(split_store)}
    out = tmp_path / "duet.mp3"
    args = ["make", str(song), "--voice", demo.DEMO_VOICE, "--voice", "demo-b@2-4", "-o", str(out)]
    args += ["--backing", "convert", "--backing-voice", "demo-b", "--f0-method", "pm", "--allow-no-vocals"]
    done = run_cover([*args, "--report", "--json"], env)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["stems"]["backing_mode"] == "convert" and result["stems"]["karaoke"] == "karaoke.onnx"
    assert [s["voices"] for s in result["quality"]["singers"]] == [[demo.DEMO_VOICE], ["demo-b"], [demo.DEMO_VOICE]]
    assert result["duration_s"] == pytest.approx(6.0, abs=0.06)
    page = (tmp_path / "duet.report.html").read_text()
    assert "Who sings where" in page and 'id="cast"' in page
    for stem in ("lead.mp3", "lead-converted.mp3", "backing.mp3"):
        assert f'src="duet.stems/{stem}"' in page
        assert (tmp_path / "duet.stems" / stem).stat().st_size > 0
    refused = run_cover([*args[:4], "-o", str(tmp_path / "x.mp3"), "--backing-voice", "demo-b"], env)
    assert refused.returncode == 3 and "--backing convert" in refused.stderr
