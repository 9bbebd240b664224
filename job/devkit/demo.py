"""Demo assets: models in the real formats with random weights, and a generated demo song.

Real weights cannot be bundled or downloaded here, so ``cover demo`` writes every model the
pipeline needs in its real file format and at its real size (so speed and memory are real), with
random weights. The demo voice is labelled ``untrained_demo`` in its ``voice.json``: it sings
noise, not a person. ``size="tiny"`` gives the same layouts at toy widths for the test suite.
"""

from __future__ import annotations

import json
import shutil
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from job.render.media.audio import MIX_SAMPLE_RATE, write_wav
from job.render.rvc.checkpoint import CONTENT_DIM, STANDARD_CONFIGS, write_checkpoint
from job.render.rvc.retrieval import build_index
from job.render.rvc.rmvpe import E2E
from job.render.rvc.synthesizer import SynthConfig, Synthesizer
from shared.model_store import CONTENT_ENCODER_DIR, PITCH_MODEL_FILE, ModelStore
from shared.voices import DEMO_RIGHTS, INDEX_FILE, MODEL_FILE, VOICE_FILE, VoiceInfo, digest_of

Size = Literal["real", "tiny"]
DEMO_VOICE = "demo-voice"
DEMO_SEPARATOR = "htdemucs"
DEMO_SIG = "955717e8"  # htdemucs' signature in Demucs' repo


def tiny_config(version: str = "v2", sample_rate: int = 48000) -> list:
    """A standard config at toy widths: same layers, names and upsampling, ~1/100 of the compute."""
    cfg = SynthConfig.from_list(STANDARD_CONFIGS[(version, sample_rate)])
    cfg.hidden_channels, cfg.inter_channels, cfg.filter_channels = 16, 16, 32
    cfg.n_layers, cfg.upsample_initial_channel, cfg.gin_channels, cfg.spk_embed_dim = 2, 32, 16, 4
    return cfg.to_list()


def write_voice(
    folder: Path,
    name: str = DEMO_VOICE,
    version: str = "v2",
    sample_rate: int = 48000,
    f0: bool = True,
    size: Size = "real",
    with_index: bool = True,
    seed: int = 0,
    vocal_range_hz: tuple[float, float] | None = (130.0, 520.0),
) -> VoiceInfo:
    """A voice folder (model.pth, model.index, voice.json) with random weights.

    Args:
        folder: the voice folder to write
        name: the voice's name in ``voice.json``
        version: the RVC version, ``v1`` or ``v2``
        sample_rate: 32000, 40000 or 48000 (a standard configuration of that rate)
        f0: a pitch-conditioned voice (RVC's usual) or one without pitch
        size: ``real`` (the standard configuration) or ``tiny`` (narrow layers, for fast tests)
        with_index: also write a faiss retrieval index
        seed: the random weights' seed
        vocal_range_hz: the range written into ``voice.json`` (None: none)
    """
    torch.manual_seed(seed)
    config = STANDARD_CONFIGS[(version, sample_rate)] if size == "real" else tiny_config(version, sample_rate)
    model = Synthesizer(SynthConfig.from_list(config), CONTENT_DIM[version], f0)
    folder.mkdir(parents=True, exist_ok=True)
    write_checkpoint(model, version, folder / MODEL_FILE, info="untrained demo voice (random weights)")
    files = {MODEL_FILE: digest_of(folder / MODEL_FILE)}
    if with_index:
        rng = np.random.default_rng(seed)
        build_index(
            rng.standard_normal((2000 if size == "real" else 400, CONTENT_DIM[version])).astype(np.float32),
            folder / INDEX_FILE,
        )
        files[INDEX_FILE] = digest_of(folder / INDEX_FILE)
    info = VoiceInfo(
        name=name,
        display_name="Demo voice (untrained)",
        description="Random weights in the real RVC format: it sings noise. For trying the pipeline only.",
        rvc_version=version,
        sample_rate=sample_rate,
        f0=f0,
        has_index=with_index,
        suggested_pitch=0,
        vocal_range_hz=vocal_range_hz,
        license="CC0-1.0",
        consent="No person's voice: random weights.",
        rights=DEMO_RIGHTS,
        untrained_demo=True,
        speakers=SynthConfig.from_list(config).spk_embed_dim,
        files=files,
    )
    (folder / VOICE_FILE).write_text(info.model_dump_json(indent=2))
    return info


def write_hubert(folder: Path, size: Size = "real", seed: int = 0) -> Path:
    """A transformers HuBERT folder with a ``final_proj`` (768 -> 256) for v1 voices."""
    from safetensors.torch import save_file
    from transformers import HubertConfig, HubertModel

    torch.manual_seed(seed)
    if size == "real":
        config = HubertConfig()
    else:  # 768 wide and 12 deep (v1/v2 need those), everything else small
        config = HubertConfig(
            hidden_size=768,
            num_hidden_layers=12,
            num_attention_heads=12,
            intermediate_size=32,
            conv_dim=(32,) * 7,
            num_conv_pos_embeddings=16,
            num_conv_pos_embedding_groups=16,
        )
    model = HubertModel(config)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    proj = nn.Linear(config.hidden_size, 256)
    state.update({f"final_proj.{k}": v for k, v in proj.state_dict().items()})
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(folder))
    save_file(state, str(folder / "model.safetensors"))
    return folder


def write_rmvpe(path: Path, seed: int = 0) -> Path:
    """``rmvpe.pt`` as distributed: the network's state dict in fp16 (about 180 MB)."""
    torch.manual_seed(seed)
    model = E2E()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: (v.half() if v.is_floating_point() else v) for k, v in model.state_dict().items()}, path)
    return path


def write_demucs(
    folder: Path, size: Size = "real", seed: int = 0, name: str = DEMO_SEPARATOR, heads: int | None = None
) -> Path:
    """An HTDemucs package and its bag file in Demucs' local-repo layout (``NAME.yaml``, ``SIG-CHECKSUM.th``).
    ``heads``: the transformer's attention heads (default: 8 real-size, 1 tiny).

    Args:
        folder: the store's ``separation/`` folder
        size: ``real`` (htdemucs' own size) or ``tiny``
        seed: the random weights' seed
        name: the bag's name (``NAME.yaml``)
        heads: the transformer's attention heads (default: 8 real-size, 1 tiny)
    """
    from demucs.htdemucs import HTDemucs
    from demucs.states import save_with_checksum

    torch.manual_seed(seed)
    sources = ["drums", "bass", "other", "vocals"]
    kwargs: dict[str, Any] = {"audio_channels": 2, "samplerate": MIX_SAMPLE_RATE, "segment": Fraction(39, 5)}
    if size == "real":
        kwargs.update(bottom_channels=512)
    else:
        kwargs.update(channels=4, depth=2, nfft=512, t_layers=1, t_heads=1, dconv_comp=2, segment=Fraction(2))
    if heads is not None:
        kwargs.update(t_heads=heads)
    model = HTDemucs(sources, **kwargs)
    state = {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    package = {"klass": HTDemucs, "args": (sources,), "kwargs": kwargs, "state": state, "training_args": {}}
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob(f"{DEMO_SIG}*.th"):
        old.unlink()
    save_with_checksum(package, folder / f"{DEMO_SIG}.th")
    (folder / f"{name}.yaml").write_text(json.dumps({"models": [DEMO_SIG]}) + "\n")
    return folder


def write_models(models_dir: Path, size: Size = "real", force: bool = False) -> None:
    """Everything the pipeline loads, in the store's layout. Skips what exists unless ``force``."""
    models_dir = Path(models_dir)
    store = ModelStore(models_dir)
    if force or not (store.separation_dir / f"{DEMO_SEPARATOR}.yaml").is_file():
        write_demucs(store.separation_dir, size)
    encoder = models_dir / CONTENT_ENCODER_DIR
    if force or not (encoder.is_dir() and any(encoder.iterdir())):  # never beside a fetched hubert_base.pt
        shutil.rmtree(encoder, ignore_errors=True)
        write_hubert(encoder, size)
    if force or not (models_dir / PITCH_MODEL_FILE).is_file():
        write_rmvpe(models_dir / PITCH_MODEL_FILE)
    demo_json = store.voice_folder(DEMO_VOICE) / VOICE_FILE
    if force or not demo_json.is_file():
        write_voice(store.voice_folder(DEMO_VOICE), size=size)
    else:  # a demo voice written before rights records existed gets its record (its files unchanged)
        info = VoiceInfo.model_validate_json(demo_json.read_text())
        if info.untrained_demo and info.rights is None:
            demo_json.write_text(info.model_copy(update={"rights": DEMO_RIGHTS}).model_dump_json(indent=2))


SONG_FORM_BEATS = (("intro", 12, False), ("verse", 32, True), ("chorus", 32, True), ("break", 16, False))
"""A song's sections (name, beats of 0.6 s, sung): the intro once, then verse, chorus and an
instrumental break over and over (7.2 s, then 19.2 + 19.2 + 9.6 s: a quarter of the song without vocals)."""


def song_form_mask(n: int, sample_rate: int) -> np.ndarray:
    """1 where :data:`SONG_FORM_BEATS` sings, 0 in the intro and the breaks, 50 ms ramps between."""
    beat = 0.6
    sung = np.zeros(n, np.float32)
    t, first = 0.0, True
    while t * sample_rate < n:
        for _, beats, sings in SONG_FORM_BEATS[0 if first else 1 :]:
            end = t + beats * beat
            if sings:
                sung[int(t * sample_rate) : int(end * sample_rate)] = 1.0
            t = end
        first = False
    ramp = int(0.05 * sample_rate)
    return np.convolve(sung, np.ones(ramp, np.float32) / ramp, mode="same").astype(np.float32)


def demo_song(
    seconds: float = 30.0, sample_rate: int = MIX_SAMPLE_RATE, seed: int = 0, form: str = "continuous"
) -> tuple[np.ndarray, np.ndarray]:
    """A song with a sung-like voice: returns (vocals, instrumental), both [2, samples] float32.

    The voice is a harmonic tone with vibrato and vowel-like formants following a melody, with
    breaths between phrases; the instrumental has kick, snare and hi-hat on a 100 bpm grid, a bass
    line and sustained chords. ``form``: ``continuous`` (phrases of 8 beats and 2 of rest, all the
    way: the worst case for a pipeline that skips silence) or ``song`` (an intro, verses, choruses and
    instrumental breaks: :data:`SONG_FORM_BEATS`).

    Args:
        seconds: its length
        sample_rate: its rate
        seed: the melody's and the noises' seed
        form: ``continuous`` or ``song``
    """
    rng = np.random.default_rng(seed)
    n = int(seconds * sample_rate)
    t = np.arange(n) / sample_rate
    beat = 0.6
    # melody: one note per beat, phrases of 8 beats with a 2-beat rest
    scale = [220.0, 246.9, 277.2, 293.7, 329.6, 370.0, 415.3, 440.0]
    beat_idx = (t / beat).astype(int)
    notes = np.array([scale[i] for i in rng.integers(0, len(scale), beat_idx.max() + 1)])
    f0 = notes[beat_idx] * (1 + 0.01 * np.sin(2 * np.pi * 5.5 * t))
    singing = (beat_idx % 10) < 8
    phase = 2 * np.pi * np.cumsum(f0) / sample_rate
    formants = (700.0, 1200.0, 2600.0)
    voice = np.zeros(n)
    for h in range(1, 25):
        freq = h * f0
        gain = sum(np.exp(-(((freq - fm) / 150.0) ** 2)) for fm in formants) + 0.3 / h
        voice += gain * np.sin(h * phase) * (freq < sample_rate / 2)
    attack = np.clip((t % beat) / 0.03, 0, 1) * np.clip((beat - t % beat) / 0.05, 0, 1)
    voice *= singing * attack
    voice += (~singing) * rng.standard_normal(n) * 0.01  # breaths
    voice = 0.25 * voice / np.max(np.abs(voice))
    if form == "song":
        voice *= song_form_mask(n, sample_rate)
    elif form != "continuous":
        raise ValueError(f"unknown song form {form!r}: continuous or song")

    inst = np.zeros((2, n))
    pos = t % beat
    kick = np.sin(2 * np.pi * 55 * pos * (1 + 2 * np.exp(-pos * 30))) * np.exp(-pos * 12)
    snare_env = np.where(beat_idx % 2 == 1, np.exp(-pos * 20), 0.0)
    snare = rng.standard_normal(n) * snare_env * 0.5
    hat_pos = t % (beat / 2)
    hat = np.diff(rng.standard_normal(n + 1)) * np.exp(-hat_pos * 80) * 0.1
    chord_root = np.array([110.0, 87.3, 130.8, 98.0])[(t / (4 * beat)).astype(int) % 4]
    chords = sum(np.sin(2 * np.pi * np.cumsum(chord_root * r) / sample_rate) for r in (1.0, 1.26, 1.5, 2.0))
    bass = np.sin(2 * np.pi * np.cumsum(chord_root / 2) / sample_rate) * (0.6 + 0.4 * np.exp(-pos * 4))
    inst[0] = 0.5 * kick + 0.3 * snare + 0.6 * hat + 0.08 * chords + 0.25 * bass
    inst[1] = 0.5 * kick + 0.3 * snare + 0.3 * hat + 0.10 * chords + 0.25 * bass
    inst = 0.5 * inst / np.max(np.abs(inst))
    vocals = np.stack([voice, voice])
    return vocals.astype(np.float32), inst.astype(np.float32)


def write_demo_song(path: Path, seconds: float = 30.0, form: str = "continuous") -> Path:
    vocals, inst = demo_song(seconds, form=form)
    return write_wav(path, np.clip(vocals + inst, -1, 1), MIX_SAMPLE_RATE)
