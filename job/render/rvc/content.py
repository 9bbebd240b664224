"""Content features: HuBERT base (our own network, :mod:`job.render.rvc.hubert`, with
``transformers``' parameter names), from either format users hold.

* a ``transformers`` folder (``config.json`` + ``model.safetensors`` or ``pytorch_model.bin``);
  a ``final_proj.*`` entry in its weights (as content-vec exports carry) serves v1 voices;
* fairseq's ``hubert_base.pt`` (what RVC tutorials distribute), converted by :func:`fairseq_to_transformers`
  (the same names, so the one network holds either).
  Its pickle also holds omegaconf/argparse configuration objects: they are read as inert records
  (:mod:`job.render.safe_load`), so neither fairseq nor omegaconf is needed or imported.

v1 voices take the 256-dim ``final_proj`` of layer 9, v2 voices the 768-dim output of layer 12.
Features come at 50 per second of 16 kHz audio (one per 320 samples). The convolutional front end
runs a few seconds at a time (:mod:`job.render.rvc.feature_encoder`); a v1 voice's features stop
at layer 9 (the three layers after it are not run).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from job.render.rvc.feature_encoder import TiledFeatureEncoder
from job.render.rvc.hubert import WEIGHT_NORM_RENAMES, Hubert, HubertSettings
from job.render.safe_load import Inert, load_weights_only, load_with_inert_objects
from job.render.weights import build_with_weights
from shared.errors import CoverError, ErrorCode

HOP = 320  # samples of 16 kHz audio per content frame
RECEPTIVE_FIELD = 400  # samples the first frame needs
OUTPUT_LAYER = {"v1": 9, "v2": 12}

_LAYER_RENAMES = [
    (r"^encoder\.layers\.(\d+)\.self_attn\.(q|k|v|out)_proj\.", r"encoder.layers.\1.attention.\2_proj."),
    (r"^encoder\.layers\.(\d+)\.self_attn_layer_norm\.", r"encoder.layers.\1.layer_norm."),
    (r"^encoder\.layers\.(\d+)\.fc1\.", r"encoder.layers.\1.feed_forward.intermediate_dense."),
    (r"^encoder\.layers\.(\d+)\.fc2\.", r"encoder.layers.\1.feed_forward.output_dense."),
    (r"^encoder\.layers\.(\d+)\.final_layer_norm\.", r"encoder.layers.\1.final_layer_norm."),
    (r"^feature_extractor\.conv_layers\.(\d+)\.0\.weight$", r"feature_extractor.conv_layers.\1.conv.weight"),
    (r"^feature_extractor\.conv_layers\.0\.2\.", r"feature_extractor.conv_layers.0.layer_norm."),
    (r"^layer_norm\.", r"feature_projection.layer_norm."),
    (r"^post_extract_proj\.", r"feature_projection.projection."),
    (r"^mask_emb$", r"masked_spec_embed"),
    (r"^encoder\.pos_conv\.0\.bias$", r"encoder.pos_conv_embed.conv.bias"),
    (r"^encoder\.pos_conv\.0\.weight_g$", r"encoder.pos_conv_embed.conv.parametrizations.weight.original0"),
    (r"^encoder\.pos_conv\.0\.weight_v$", r"encoder.pos_conv_embed.conv.parametrizations.weight.original1"),
    (r"^encoder\.layer_norm\.", r"encoder.layer_norm."),
]
_DROPPED = ("label_embs_concat", "final_proj.")


def _find_setting(obj: Any, key: str, depth: int = 0) -> Any:  # noqa: PLR0911 - reads best top to bottom
    """Find ``key`` in a config tree of dicts, lists and inert records (omegaconf's nodes included)."""
    if depth > 12:
        return None
    if isinstance(obj, Inert):
        for part in (obj.state, obj.args, obj.kwargs):
            found = _find_setting(part, key, depth + 1)
            if found is not None:
                return found
        return None
    if isinstance(obj, dict):
        if key in obj:
            value = obj[key]
            if isinstance(value, Inert):  # an omegaconf ValueNode keeps its value in state['_val']
                value = _find_setting(value, "_val", depth + 1)
            return value if isinstance(value, (int, float, str, bool)) else None
        items: Iterable[Any] = obj.values()
    elif isinstance(obj, (list, tuple)):
        items = obj
    else:
        return None
    for item in items:
        found = _find_setting(item, key, depth + 1)
        if found is not None:
            return found
    return None


def fairseq_to_transformers(
    checkpoint: dict,
) -> tuple[HubertSettings, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Map a fairseq HuBERT checkpoint to (its settings, a state dict with ``transformers``' names,
    final_proj's state)."""
    state = checkpoint.get("model") if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or "post_extract_proj.weight" not in state:
        raise CoverError(ErrorCode.MODEL_CORRUPT, "not a fairseq HuBERT checkpoint (no model.post_extract_proj)")
    converted: dict[str, torch.Tensor] = {}
    final_proj = {k[len("final_proj.") :]: v for k, v in state.items() if k.startswith("final_proj.")}
    for key, value in state.items():
        if key.startswith(_DROPPED):
            continue
        for pattern, repl in _LAYER_RENAMES:
            new, n = re.subn(pattern, repl, key)
            if n:
                converted[new] = value.float()
                break
        else:
            raise CoverError(ErrorCode.MODEL_MISMATCH, f"unexpected key in fairseq HuBERT checkpoint: {key}")
    hidden = state["post_extract_proj.weight"].shape[0]
    n_conv = len([k for k in converted if re.match(r"feature_extractor\.conv_layers\.\d+\.conv\.weight", k)])
    convs = [converted[f"feature_extractor.conv_layers.{i}.conv.weight"] for i in range(n_conv)]
    pos_v = converted["encoder.pos_conv_embed.conv.parametrizations.weight.original1"]
    heads = (
        _find_setting(checkpoint.get("cfg"), "encoder_attention_heads")
        or _find_setting(checkpoint.get("args"), "encoder_attention_heads")
        or hidden // 64
    )
    config = HubertSettings(
        hidden_size=hidden,
        num_hidden_layers=len({k.split(".")[2] for k in converted if k.startswith("encoder.layers.")}),
        num_attention_heads=int(heads),
        intermediate_size=converted["encoder.layers.0.feed_forward.intermediate_dense.weight"].shape[0],
        conv_dim=tuple(int(w.shape[0]) for w in convs),
        conv_kernel=tuple(int(w.shape[-1]) for w in convs),
        conv_stride=tuple(5 if i == 0 else 2 for i in range(n_conv)),
        conv_bias=False,
        feat_extract_norm="group",
        num_conv_pos_embeddings=int(pos_v.shape[-1]),
        num_conv_pos_embedding_groups=hidden // int(pos_v.shape[1]),
        do_stable_layer_norm=False,
    )
    return config, converted, final_proj


class ContentEncoder:
    """HuBERT features for RVC. Load once, reuse for every conversion."""

    def __init__(self, model: Hubert, final_proj: nn.Linear | None) -> None:
        model.feature_extractor = TiledFeatureEncoder(model.feature_extractor)  # a drop-in
        self.model = model.eval()
        self.final_proj = final_proj.eval() if final_proj is not None else None

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    def frames(self, samples: int) -> int:
        """How many feature frames :meth:`features` gives for ``samples`` of audio."""
        encoder: TiledFeatureEncoder = self.model.feature_extractor  # type: ignore[assignment]  # set in __init__
        return encoder.frames(samples)

    def output_dim(self, version: str) -> int:
        """The features' width for a ``version`` voice (v1: ``final_proj``'s, v2: the hidden size)."""
        if version == "v1" and self.final_proj is not None:
            return int(self.final_proj.out_features)
        return self.hidden_size

    def to(self, device: torch.device) -> ContentEncoder:
        self.model.to(device)
        if self.final_proj is not None:
            self.final_proj.to(device)
        return self

    @torch.inference_mode()
    def features(self, audio: torch.Tensor, version: str) -> torch.Tensor:
        """16 kHz audio [B, samples] -> features [B, frames, 256 (v1) | 768 (v2)]."""
        layer = OUTPUT_LAYER[version]
        if layer > self.model.config.num_hidden_layers:
            raise CoverError(
                ErrorCode.MODEL_MISMATCH,
                f"the content encoder has {self.model.config.num_hidden_layers} layers; {version} needs {layer}",
            )
        if version == "v1" and self.final_proj is None:
            raise CoverError(
                ErrorCode.MODEL_MISMATCH, "v1 voices need HuBERT's final_proj, which this content encoder lacks"
            )
        hidden = self.model(audio, layers=layer).last_hidden_state  # transformers' hidden_states[layer]
        return hidden if version == "v2" else self.final_proj(hidden)  # type: ignore[misc]  # checked above


def _final_proj_module(state: dict[str, torch.Tensor]) -> nn.Linear | None:
    if "weight" not in state:
        return None
    out_dim, in_dim = state["weight"].shape
    layer = nn.Linear(in_dim, out_dim)
    layer.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return layer


def _load_transformers_folder(folder: Path) -> ContentEncoder:
    from safetensors.torch import load_file

    weights = folder / "model.safetensors"
    state = load_file(str(weights)) if weights.is_file() else load_weights_only(folder / "pytorch_model.bin")
    try:
        config = HubertSettings.model_validate_json((folder / "config.json").read_bytes())
    except ValueError as exc:
        raise CoverError(ErrorCode.MODEL_MISMATCH, f"{folder.name}/config.json is not HuBERT's: {exc}") from None
    final_proj = {k[len("final_proj.") :]: v for k, v in state.items() if k.startswith("final_proj.")}
    state = {k.removeprefix("hubert."): v for k, v in state.items() if not k.startswith("final_proj.")}
    state = {WEIGHT_NORM_RENAMES.get(k, k): v for k, v in state.items()}
    return ContentEncoder(_build(config, state, folder.name), _final_proj_module(final_proj))


def _build(config: HubertSettings, state: dict[str, torch.Tensor], name: str) -> Hubert:
    """HuBERT holding ``state`` (emptied as it is taken: no second copy of the weights)."""
    try:
        return build_with_weights(lambda: Hubert(config), state)
    except RuntimeError as exc:
        raise CoverError(ErrorCode.MODEL_MISMATCH, f"{name} does not fit HuBERT: {str(exc)[:400]}") from None


def load_fairseq_hubert(path: Path) -> ContentEncoder:
    checkpoint = load_with_inert_objects(path)
    config, state, final_proj = fairseq_to_transformers(checkpoint)
    del checkpoint  # its tensors are now only in state and final_proj
    return ContentEncoder(_build(config, state, path.name), _final_proj_module(final_proj))


def load_content_encoder(location: Path) -> ContentEncoder:
    """``location``: a transformers folder, a fairseq ``.pt``, or a folder holding one ``.pt``."""
    location = Path(location)
    if location.is_dir() and (location / "config.json").is_file():
        return _load_transformers_folder(location)
    if location.is_dir():
        candidates = sorted(location.glob("*.pt"))
        if not candidates:
            raise CoverError(
                ErrorCode.MODEL_MISSING,
                f"no content encoder in {location}: expected a transformers folder or hubert_base.pt",
            )
        location = candidates[0]
    if not location.is_file():
        raise CoverError(ErrorCode.MODEL_MISSING, f"content encoder not found: {location}")
    return load_fairseq_hubert(location)
