"""MDX-Net stem models: the runtime's chunking and arithmetic checked through ONNX models built
with known functions (identity, gain, bias), the parameter table, and what `cover models add`
accepts and refuses. Real karaoke and de-reverb weights cannot be downloaded here: random-weight
MDX-Net-shaped models (job/devkit/mdx.py) show the plumbing, not the separation."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from job.devkit import mdx as devkit
from job.render.media.audio import MIX_SAMPLE_RATE, read_wav, write_wav
from job.render.separate import mdx_params
from job.render.separate.mdx import MdxModel
from job.render.separate.mdx_params import MdxKind, MdxParams, params_for, parse_params, uvr_hash
from shared.errors import CoverError, ErrorCode
from tests.conftest import run_cover

FULL_BAND = MdxParams(n_fft=2048, dim_f=1025, dim_t=16, compensate=1.0, primary="vocals")  # every bin kept


def _noise(seconds: float, seed: int = 0) -> np.ndarray:
    return (0.2 * np.random.default_rng(seed).standard_normal((2, int(seconds * MIX_SAMPLE_RATE)))).astype(np.float32)


def _split(tmp_path: Path, model: Path, params: MdxParams, audio: np.ndarray, denoise: bool = False):
    src = write_wav(tmp_path / "in.wav", audio, MIX_SAMPLE_RATE)
    first, second = MdxModel(model, params, threads=1).split(
        src, tmp_path / "primary.wav", tmp_path / "secondary.wav", denoise
    )
    return read_wav(first)[0], read_wav(second)[0]


def test_an_identity_model_gives_back_the_signal_exactly_across_chunks_and_edges(tmp_path):
    audio = _noise(1.3)  # 57330 samples: four chunks of 13312 kept samples and a short last one
    assert audio.shape[-1] % FULL_BAND.step != 0
    model = devkit.write_affine(tmp_path / "identity.onnx", FULL_BAND.dim_f, FULL_BAND.dim_t)
    primary, secondary = _split(tmp_path, model, FULL_BAND, audio)
    assert primary.shape == audio.shape
    assert np.max(np.abs(primary - audio)) < 1e-5
    assert np.max(np.abs(secondary)) < 1e-5  # mix - primary * 1.0


def test_bins_above_dim_f_are_dropped_and_a_signal_below_them_survives(tmp_path):
    params = MdxParams(n_fft=2048, dim_f=512, dim_t=16, compensate=1.0, primary="vocals")  # up to ~11 kHz
    t = np.arange(int(1.0 * MIX_SAMPLE_RATE)) / MIX_SAMPLE_RATE
    low = 0.3 * np.sin(2 * np.pi * 440 * t)
    high = 0.3 * np.sin(2 * np.pi * 16000 * t)
    model = devkit.write_affine(tmp_path / "identity.onnx", params.dim_f, params.dim_t)
    primary, _ = _split(tmp_path, model, params, np.stack([low + high, low]).astype(np.float32))
    middle = slice(2048, -2048)
    assert np.max(np.abs(primary[1, middle] - low[middle])) < 1e-3
    assert np.max(np.abs(primary[0, middle] - low[middle])) < 1e-3  # the 16 kHz tone is gone


def test_the_secondary_stem_is_the_mix_minus_the_primary_times_compensate(tmp_path):
    params = FULL_BAND.model_copy(update={"compensate": 1.035})
    audio = _noise(0.8, seed=1)
    model = devkit.write_affine(tmp_path / "half.onnx", params.dim_f, params.dim_t, gain=0.5)
    primary, secondary = _split(tmp_path, model, params, audio)
    assert np.max(np.abs(primary - 0.5 * audio)) < 1e-5
    assert np.max(np.abs(secondary - (audio - 0.5 * audio * 1.035))) < 1e-5


def test_denoise_cancels_what_the_model_adds_whatever_its_input(tmp_path):
    """0.5 * (f(x) - f(-x)) with f(x) = x + b is x: the bias (the network's own noise) cancels."""
    audio = _noise(0.8, seed=2)
    model = devkit.write_affine(tmp_path / "biased.onnx", FULL_BAND.dim_f, FULL_BAND.dim_t, bias=0.05)
    plain, _ = _split(tmp_path, model, FULL_BAND, audio)
    clean, _ = _split(tmp_path, model, FULL_BAND, audio, denoise=True)
    assert np.max(np.abs(plain - audio)) > 1e-3  # the bias shows without denoise
    assert np.max(np.abs(clean - audio)) < 1e-5


def test_the_peak_is_normalised_for_the_model_and_restored_after(tmp_path):
    """A model that clips at 1 sees the stem at peak 1 whatever the stem's level."""
    quiet = _noise(0.8, seed=3) * 0.01
    model = devkit.write_affine(tmp_path / "identity.onnx", FULL_BAND.dim_f, FULL_BAND.dim_t)
    primary, _ = _split(tmp_path, model, FULL_BAND, quiet)
    assert np.max(np.abs(primary - quiet)) < 1e-7


@pytest.mark.parametrize("denoise", [False, True], ids=["plain", "denoise"])
def test_on_torch_a_split_gives_onnx_runtime_s_stems(tmp_path, denoise):
    """The MDX-Net layout (random weights) split on torch with the CPU's fast layout: the stems of
    ONNX Runtime's split, to float32 rounding, through the chunking, the edges and denoise."""
    params = MdxParams(n_fft=2048, dim_f=256, dim_t=16, compensate=1.03, primary="instrumental")
    model = devkit.write_convtdf(tmp_path / "m.onnx", params.dim_f, params.dim_t, size="tiny", seed=1)
    src = write_wav(tmp_path / "in.wav", _noise(0.9), MIX_SAMPLE_RATE)
    stems = {}
    for name, runner in (("onnxruntime", MdxModel(model, params)), ("torch", MdxModel(model, params, on_torch=True))):
        assert runner.arithmetic == ("onnxruntime" if name == "onnxruntime" else "torch-fp32")
        (tmp_path / name).mkdir()
        made = runner.split(src, tmp_path / name / "a.wav", tmp_path / name / "b.wav", denoise)
        stems[name] = [read_wav(p)[0] for p in made]
    for ours, reference in zip(stems["torch"], stems["onnxruntime"], strict=True):
        assert np.max(np.abs(reference)) > 1e-5  # the network gives something
        assert np.max(np.abs(ours - reference)) < 1e-5 * np.max(np.abs(reference)) + 1e-7


def test_a_model_torch_cannot_run_stays_on_onnx_runtime(tmp_path, caplog):
    """An operator in the torch runner's table in a form it does not take (Pad's wrap mode): tried on
    a silent chunk when the model loads, it fails there and the model runs on ONNX Runtime."""
    import onnx
    from onnx import TensorProto, helper

    shape = ["batch", 4, FULL_BAND.dim_f, FULL_BAND.dim_t]
    graph = helper.make_graph(
        [helper.make_node("Pad", ["input", "pads"], ["output"], mode="wrap")],
        "wrap",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, shape)],
        initializer=[onnx.numpy_helper.from_array(np.zeros(8, dtype=np.int64), "pads")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    proto.ir_version = 9
    path = tmp_path / "wrap.onnx"
    path.write_bytes(proto.SerializeToString())
    runner = MdxModel(path, FULL_BAND, on_torch=True)
    assert runner.arithmetic == "onnxruntime" and "wrap.onnx stays on ONNX Runtime" in caplog.text
    audio = _noise(0.5)
    primary, _ = _split(tmp_path, path, FULL_BAND, audio)
    assert np.max(np.abs(primary - audio)) < 1e-5


def test_uvr_hash_is_the_md5_of_the_files_last_10000_kib(tmp_path):
    small, big = tmp_path / "small.onnx", tmp_path / "big.onnx"
    small.write_bytes(b"x" * 1000)
    payload = np.random.default_rng(0).bytes(10_000 * 1024 + 5000)
    big.write_bytes(payload)
    assert uvr_hash(small) == hashlib.md5(b"x" * 1000).hexdigest()
    assert uvr_hash(big) == hashlib.md5(payload[5000:]).hexdigest()


def test_parameters_are_found_by_the_files_hash_and_a_model_of_the_wrong_kind_is_refused(tmp_path, monkeypatch):
    model = devkit.write_affine(tmp_path / "kara.onnx", 64, 16)
    table = tmp_path / "known.json"
    entry = {"name": "Test_KARA", "kind": "karaoke", "n_fft": 2048, "dim_f": 64, "dim_t": 16, "compensate": 1.05}
    table.write_text(json.dumps({uvr_hash(model): {**entry, "primary": "instrumental"}}))
    monkeypatch.setattr(mdx_params, "KNOWN_MODELS_FILE", table)
    mdx_params.known_models.cache_clear()
    try:
        params, name, origin = params_for(model, MdxKind.KARAOKE, None)
        assert (name, origin, params.n_fft, params.compensate, params.primary) == (
            "Test_KARA",
            "known",
            2048,
            1.05,
            "instrumental",
        )
        with pytest.raises(CoverError) as wrong:
            params_for(model, MdxKind.DEREVERB, None)
        assert wrong.value.code is ErrorCode.OPTIONS_INVALID and "karaoke model" in wrong.value.message
    finally:
        mdx_params.known_models.cache_clear()


def test_the_shipped_table_knows_the_karaoke_and_de_reverb_models_people_use():
    known = {m.name: m for m in mdx_params.known_models().values()}
    assert known["UVR_MDXNET_KARA_2"].kind is MdxKind.KARAOKE
    assert (known["UVR_MDXNET_KARA_2"].n_fft, known["UVR_MDXNET_KARA_2"].dim_f) == (5120, 2048)
    assert known["Reverb_HQ_By_FoxJoy"].kind is MdxKind.DEREVERB
    assert known["Reverb_HQ_By_FoxJoy"].dim_t == 512


def test_given_parameters_are_parsed_and_checked_in_their_own_words():
    p = parse_params("n_fft=5120, dim_f=2048,dim_t=256,compensate=1.035,primary=instrumental")
    assert (p.n_fft, p.dim_f, p.dim_t, p.compensate, p.primary) == (5120, 2048, 256, 1.035, "instrumental")
    for bad, said in [
        ("n_fft=5120,dim_f=4000,dim_t=256,primary=vocals", "more than n_fft"),
        ("n_fft=5120,dim_f=2048,dim_t=256", "primary"),
        ("n_fft=5120,dim_f", "NAME=VALUE"),
        ("n_fft=5120,dim_f=2048,dim_t=256,primary=drums", "primary"),
    ]:
        with pytest.raises(CoverError) as error:
            parse_params(bad)
        assert error.value.code is ErrorCode.OPTIONS_INVALID and said in error.value.message, bad


def _mdx_files(store: Path) -> list[str]:
    folder = store / "separation" / "mdx"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


@pytest.fixture
def empty_store(tmp_path) -> dict[str, str]:
    import os

    return {**os.environ, "COVER_MODELS_DIR": str(tmp_path / "models")}


def test_models_add_installs_a_model_with_given_parameters_and_refuses_a_second_without_replace(tmp_path, empty_store):
    model = devkit.write_convtdf(tmp_path / "my_kara.onnx", 64, 16)
    params = "n_fft=2048,dim_f=64,dim_t=16,compensate=1.065,primary=instrumental"
    done = run_cover(["models", "add", str(model), "--kind", "karaoke", "--mdx-params", params, "--json"], empty_store)
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    assert (info["kind"], info["name"], info["params_from"], info["params"]["compensate"]) == (
        "karaoke",
        "my_kara.onnx",
        "given",
        1.065,
    )
    store = Path(empty_store["COVER_MODELS_DIR"])
    assert _mdx_files(store) == ["karaoke.json", "karaoke.onnx"]
    again = run_cover(["models", "add", str(model), "--kind", "karaoke", "--mdx-params", params], empty_store)
    assert again.returncode == 3 and "--replace" in again.stderr
    replaced = run_cover(
        ["models", "add", str(model), "--kind", "karaoke", "--mdx-params", params, "--replace"], empty_store
    )
    assert replaced.returncode == 0, replaced.stderr
    assert "added karaoke model my_kara.onnx" in replaced.stdout


def test_an_unknown_model_without_parameters_is_refused_and_nothing_is_written(tmp_path, empty_store):
    model = devkit.write_affine(tmp_path / "mystery.onnx", 64, 16)
    done = run_cover(["models", "add", str(model), "--kind", "dereverb"], empty_store)
    assert done.returncode == 4
    assert "[model.mismatch]" in done.stderr and "--mdx-params" in done.stderr and "not a model we know" in done.stderr
    assert _mdx_files(Path(empty_store["COVER_MODELS_DIR"])) == []
    no_kind = run_cover(["models", "add", str(model)], empty_store)
    assert no_kind.returncode == 3 and "--kind" in no_kind.stderr


@pytest.mark.parametrize(
    ("content", "code"),
    [
        (b"\x08\x07garbage that is no protobuf \xff\xff\xff", "model.corrupt"),
        (b"", "model.corrupt"),
        ("external", "model.unsafe"),
        ("wrong-shape", "model.mismatch"),
    ],
)
def test_a_bad_onnx_file_is_refused_with_its_code_and_nothing_is_written(tmp_path, empty_store, content, code):
    import onnx

    path = tmp_path / "bad.onnx"
    if content == "external":  # its weights in a file beside it, named by path: never read
        devkit.write_affine(path, 64, 16, gain=0.5)
        proto = onnx.load(path)
        onnx.save_model(proto, path, save_as_external_data=True, all_tensors_to_one_file=True, size_threshold=0)
        assert any(
            t.data_location == onnx.TensorProto.EXTERNAL
            for t in onnx.load(path, load_external_data=False).graph.initializer
        )
    elif content == "wrong-shape":
        devkit.write_affine(path, 32, 16)
    else:
        path.write_bytes(content)
    params = "n_fft=2048,dim_f=64,dim_t=16,primary=reverb"
    done = run_cover(["models", "add", str(path), "--kind", "dereverb", "--mdx-params", params], empty_store)
    assert done.returncode == 4, done.stderr
    assert f"[{code}]" in done.stderr
    assert _mdx_files(Path(empty_store["COVER_MODELS_DIR"])) == []


def test_a_random_weight_mdx_net_model_runs_end_to_end(tmp_path):
    """The MDX-Net layout (devkit, tiny) through the runtime: the stems add back up to the mix."""
    params = MdxParams(n_fft=2048, dim_f=64, dim_t=16, compensate=1.035, primary="vocals")
    model = devkit.write_convtdf(tmp_path / "net.onnx", params.dim_f, params.dim_t)
    audio = _noise(0.7, seed=4)
    primary, secondary = _split(tmp_path, model, params, audio)
    assert primary.shape == secondary.shape == audio.shape
    assert np.all(np.isfinite(primary)) and np.max(np.abs(primary)) > 0
    assert np.max(np.abs(secondary + primary * 1.035 - audio)) < 1e-5


def test_a_silent_stretch_is_not_run_through_the_network(tmp_path, monkeypatch):
    """An instrumental break in a vocal stem (under -60 dBFS) costs no network call; the rest is
    split as before."""
    audio = _noise(2.0, seed=5)
    audio[:, int(0.4 * MIX_SAMPLE_RATE) : int(1.6 * MIX_SAMPLE_RATE)] *= 1e-4  # 1.2 s at -84 dBFS
    model = devkit.write_affine(tmp_path / "identity.onnx", FULL_BAND.dim_f, FULL_BAND.dim_t)
    calls: list[int] = []
    run = MdxModel.run
    monkeypatch.setattr(MdxModel, "run", lambda self, spec: calls.append(1) or run(self, spec))
    primary, secondary = _split(tmp_path, model, FULL_BAND, audio)
    chunks = -(-audio.shape[-1] // FULL_BAND.step)
    assert len(calls) < chunks  # at least one chunk (with its edges) lay in the break
    assert np.max(np.abs(primary - audio)) < 1e-3  # where it was skipped, the difference is the break's level
    assert np.max(np.abs(primary + secondary - audio)) < 1e-5


def test_the_passes_run_on_torch_unless_the_reference_is_asked_for():
    from job.render import compute

    assert compute.resolve_graph_runtime("auto", fast=True) is True  # every device, the settings' precision
    assert compute.resolve_graph_runtime("auto", fast=False) is False  # the exact path: ONNX Runtime
    assert compute.resolve_graph_runtime("onnxruntime", fast=True) is False
    assert compute.resolve_graph_runtime("torch", fast=False) is True
    with pytest.raises(CoverError, match="mdx_runtime must be") as refused:
        compute.resolve_graph_runtime("tensorrt", fast=True)
    assert refused.value.code is ErrorCode.OPTIONS_INVALID
