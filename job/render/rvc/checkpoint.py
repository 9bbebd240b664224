"""RVC voice checkpoints: reading (safely, strictly), validating, and writing them.

A voice ``.pth`` is a pickled dict: ``weight`` (the synthesizer's state dict, often fp16, with
weight-normalised layers stored as ``weight_g``/``weight_v``), ``config`` (18 hyper-parameters,
see :class:`SynthConfig`), ``f0`` (1 or 0), ``version`` (``v1``: 256-dim content, ``v2``: 768-dim)
and ``sr`` (e.g. ``"48k"``), sometimes ``info`` and other metadata.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict

from job.render.rvc.synthesizer import SynthConfig, Synthesizer
from job.render.safe_load import load_weights_only
from job.render.weights import TooLargeError, build_unfilled, fill, room_for
from shared.errors import CoverError, ErrorCode

CONTENT_DIM = {"v1": 256, "v2": 768}
_RB = ["1", [3, 7, 11], [[1, 3, 5], [1, 3, 5], [1, 3, 5]]]
_HEAD = [192, 192, 768, 2, 6, 3, 0]
# The reference training configs, by (version, sample rate).
STANDARD_CONFIGS: dict[tuple[str, int], list] = {
    ("v1", 32000): [513, 32, *_HEAD, *_RB, [10, 4, 2, 2, 2], 512, [16, 16, 4, 4, 4], 109, 256, 32000],
    ("v1", 40000): [1025, 32, *_HEAD, *_RB, [10, 10, 2, 2], 512, [16, 16, 4, 4], 109, 256, 40000],
    ("v1", 48000): [1025, 32, *_HEAD, *_RB, [10, 6, 2, 2, 2], 512, [16, 16, 4, 4, 4], 109, 256, 48000],
    ("v2", 32000): [513, 32, *_HEAD, *_RB, [10, 8, 2, 2], 512, [20, 16, 4, 4], 109, 256, 32000],
    ("v2", 40000): [1025, 32, *_HEAD, *_RB, [10, 10, 2, 2], 512, [16, 16, 4, 4], 109, 256, 40000],
    ("v2", 48000): [1025, 32, *_HEAD, *_RB, [12, 10, 2, 2], 512, [24, 20, 4, 4], 109, 256, 48000],
}
# Layers the reference wraps in weight normalisation (stored as weight_g / weight_v).
_WEIGHT_NORMED = (".ups.", ".resblocks.", ".in_layers.", ".res_skip_layers.", ".cond_layer.")


class VoiceCheckpoint(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True)

    config: SynthConfig
    version: Literal["v1", "v2"]
    f0: bool
    sample_rate: int
    info: str = ""
    weight: dict[str, Any]


def _norm_except_dim0(v: torch.Tensor) -> torch.Tensor:
    return v.flatten(1).norm(dim=1).view(-1, *([1] * (v.dim() - 1)))


def fold_weight_norm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Replace ``X.weight_g``/``X.weight_v`` (or torch's parametrization keys) by ``X.weight``."""
    out: dict[str, torch.Tensor] = {}
    pairs = {".weight_g": ".weight_v", ".parametrizations.weight.original0": ".parametrizations.weight.original1"}
    for key, value in state.items():
        for g_suffix, v_suffix in pairs.items():
            if key.endswith(g_suffix):
                base = key[: -len(g_suffix)]
                v = state.get(base + v_suffix)
                if v is None:
                    raise CoverError(ErrorCode.MODEL_MISMATCH, f"{key} has no matching {base + v_suffix}")
                out[base + ".weight"] = value.float() * v.float() / _norm_except_dim0(v.float())
                break
            if key.endswith(v_suffix):
                break
        else:
            out[key] = value
    return out


def unfold_weight_norm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Store the reference's weight-normalised layers as ``weight_g``/``weight_v`` (for writing)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.endswith(".weight") and any(part in f".{key}" for part in _WEIGHT_NORMED):
            base = key[: -len(".weight")]
            out[base + ".weight_g"] = _norm_except_dim0(value)
            out[base + ".weight_v"] = value.clone()
        else:
            out[key] = value
    return out


def _sample_rate(raw: Any, config: SynthConfig) -> int:
    if isinstance(raw, str) and raw.lower().endswith("k") and raw[:-1].isdigit():
        return int(raw[:-1]) * 1000
    if isinstance(raw, (int, str)) and str(raw).isdigit():
        return int(raw)
    return config.sr


def parse_checkpoint(raw: Any, name: str = "checkpoint") -> VoiceCheckpoint:
    if not isinstance(raw, dict) or not isinstance(raw.get("weight"), dict) or "config" not in raw:
        raise CoverError(
            ErrorCode.MODEL_CORRUPT, f"{name} is not an RVC voice model: it needs 'weight' and 'config' entries"
        )
    weight = raw["weight"]
    if not all(isinstance(v, torch.Tensor) for v in weight.values()):
        raise CoverError(ErrorCode.MODEL_CORRUPT, f"{name}: 'weight' must hold only tensors")
    try:
        config = SynthConfig.from_list(list(raw["config"]))
    except (ValueError, TypeError) as exc:
        raise CoverError(ErrorCode.MODEL_CORRUPT, f"{name}: unreadable 'config': {exc}") from None
    version = str(raw.get("version", "v1"))
    if version not in CONTENT_DIM:
        raise CoverError(ErrorCode.MODEL_MISMATCH, f"{name}: unknown RVC version {version!r} (v1 or v2)")
    emb = weight.get("enc_p.emb_phone.weight")
    if emb is None or emb.dim() != 2:
        raise CoverError(ErrorCode.MODEL_MISMATCH, f"{name}: missing enc_p.emb_phone.weight")
    if emb.shape[1] != CONTENT_DIM[version]:
        raise CoverError(
            ErrorCode.MODEL_MISMATCH,
            f"{name} says {version} ({CONTENT_DIM[version]}-dim content) but its content layer "
            f"takes {emb.shape[1]}-dim features",
        )
    if "emb_g.weight" in weight:  # the reference trusts the embedding table over the config here
        config.spk_embed_dim = int(weight["emb_g.weight"].shape[0])
    f0 = bool(int(raw.get("f0", 1)))
    return VoiceCheckpoint(
        config=config,
        version=version,
        f0=f0,
        sample_rate=_sample_rate(raw.get("sr"), config),
        info=str(raw.get("info", "")),
        weight=weight,
    )


def read_checkpoint(path: Path) -> VoiceCheckpoint:
    """Read a voice ``.pth`` without executing pickled code."""
    return parse_checkpoint(load_weights_only(Path(path)), Path(path).name)


# what a sane RVC config declares, at most (the standard ones: 192/768 channels, 6 layers, 4-5 upsamplers)
CONFIG_LIMITS = {
    "channels": 4096,
    "layers": 64,
    "heads": 64,
    "kernel": 64,
    "upsamplers": 8,
    "rate": 64,
    "speakers": 1024,
    "sample_rate": 96000,
}


def _check_bounds(config: SynthConfig, name: str) -> None:
    """Refuse a config whose declared sizes no real voice has (``model.corrupt``), before anything
    is built from it."""
    c, limits = config, CONFIG_LIMITS
    checks = [
        (
            max(
                c.spec_channels,
                c.inter_channels,
                c.hidden_channels,
                c.filter_channels,
                c.upsample_initial_channel,
                c.gin_channels,
            ),
            limits["channels"],
            "channels",
        ),
        (c.n_layers, limits["layers"], "layers"),
        (c.n_heads, limits["heads"], "attention heads"),
        (max([c.kernel_size, *c.resblock_kernel_sizes, *c.upsample_kernel_sizes]), limits["kernel"], "kernel size"),
        (max(len(c.upsample_rates), len(c.resblock_kernel_sizes)), limits["upsamplers"], "upsampling stages"),
        (
            max([*c.upsample_rates, *(d for ds in c.resblock_dilation_sizes for d in ds)]),
            limits["rate"],
            "upsampling rate or dilation",
        ),
        (c.spk_embed_dim, limits["speakers"], "speakers"),
        (c.sr, limits["sample_rate"], "sample rate"),
    ]
    for value, limit, what in checks:
        if value > limit:
            raise CoverError(ErrorCode.MODEL_CORRUPT, f"{name} declares {value} {what}; a voice has at most {limit}")
    values = [
        c.spec_channels,
        c.inter_channels,
        c.hidden_channels,
        c.filter_channels,
        c.n_heads,
        c.n_layers,
        c.kernel_size,
        c.upsample_initial_channel,
        c.spk_embed_dim,
        c.gin_channels,
        c.sr,
        *c.upsample_rates,
        *c.upsample_kernel_sizes,
        *c.resblock_kernel_sizes,
    ]
    if min(values) < 1 or c.hidden_channels % max(c.n_heads, 1):
        raise CoverError(ErrorCode.MODEL_CORRUPT, f"{name} declares sizes no network has")


def build_synthesizer(ckpt: VoiceCheckpoint, name: str = "checkpoint") -> Synthesizer:
    """Instantiate the network and load the weights strictly, weight norm folded away.

    The declared architecture is checked against sane bounds, then built without its random
    initialisation (:func:`~job.render.weights.build_unfilled`: each tensor sized before it is
    allocated, past :func:`~job.render.weights.room_for` the checkpoint's tensors ``model.corrupt``;
    allocated, never written, so no page of it is resident) and compared with the checkpoint's
    tensors; only a checkpoint whose tensors fit it exactly fills it. The network holds the
    checkpoint's tensors themselves (float32)."""
    _check_bounds(ckpt.config, name)
    state = fold_weight_norm(ckpt.weight)
    try:
        unfilled = build_unfilled(lambda: Synthesizer(ckpt.config, CONTENT_DIM[ckpt.version], ckpt.f0), room_for(state))
    except TooLargeError:
        raise CoverError(ErrorCode.MODEL_CORRUPT, f"{name} declares a network larger than its tensors") from None
    expected = unfilled.module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [
        f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
        for k in expected
        if k in state and state[k].shape != expected[k].shape
    ]
    del expected
    if missing or unexpected or wrong:
        details = "; ".join(
            part
            for part in (
                f"missing {len(missing)} (e.g. {', '.join(missing[:3])})" if missing else "",
                f"unexpected {len(unexpected)} (e.g. {', '.join(unexpected[:3])})" if unexpected else "",
                f"wrong shape: {', '.join(wrong[:3])}" if wrong else "",
            )
            if part
        )
        raise CoverError(
            ErrorCode.MODEL_MISMATCH,
            f"{name} does not fit the RVC {ckpt.version} {'pitch' if ckpt.f0 else 'no-pitch'} "
            f"architecture of its config: {details}",
        )
    return fill(unfilled, state)


def write_checkpoint(model: Synthesizer, version: str, path: Path, half: bool = True, info: str = "") -> Path:
    """Save ``model`` as the reference trainer does (used by the demo assets and the tests).

    Args:
        model: the network
        version: ``v1`` or ``v2``
        path: the ``.pth`` to write
        half: store the weights in float16, as the trainer's inference exports do
        info: the checkpoint's ``info`` string
    """
    state = unfold_weight_norm({k: v.detach() for k, v in model.state_dict().items()})
    if half:
        state = {k: v.half() for k, v in state.items()}
    sr = model.config.sr
    package = {
        "weight": state,
        "config": model.config.to_list(),
        "info": info,
        "sr": f"{sr // 1000}k",
        "f0": int(model.f0),
        "version": version,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(package, path)
    return path
