"""What an MDX-Net model needs to be run: its STFT and spectrogram shape, its compensation and
which stem it outputs. UVR's ONNX files carry none of it; the community keys it by the file's
"UVR hash" (the MD5 of its last 10 000 KiB, of the whole file when it is smaller), and so do we:
``mdx_models.json`` beside this module holds the models we know, and a model it does not know
is added with its parameters given (``cover models add FILE.onnx --kind K --mdx-params ...``).

Pure data and parsing: no onnxruntime here (the command line checks parameters before loading).
"""

from __future__ import annotations

import hashlib
import json
from enum import Enum
from functools import cache
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from shared.errors import CoverError, ErrorCode

HOP = 1024  # every MDX-Net model's STFT hop
UVR_HASH_TAIL = 10_000 * 1024
KNOWN_MODELS_FILE = Path(__file__).with_name("mdx_models.json")


class MdxKind(str, Enum):  # noqa: UP042 - str() of a member is its value, in messages
    KARAOKE = "karaoke"  # splits vocals into lead and backing
    DEREVERB = "dereverb"  # splits (lead) vocals into dry voice and reverb


Primary = Literal["vocals", "instrumental", "reverb", "no-reverb"]
PRIMARY_FOR: dict[MdxKind, tuple[str, str]] = {  # the two stems a kind may name as its primary
    MdxKind.KARAOKE: ("vocals", "instrumental"),
    MdxKind.DEREVERB: ("reverb", "no-reverb"),
}


class MdxParams(BaseModel):
    """One model's runtime parameters (UVR's ``mdx_n_fft_scale_set``, ``mdx_dim_f_set``,
    ``2 ** mdx_dim_t_set``, ``compensate``, ``primary_stem``)."""

    model_config = ConfigDict(extra="forbid")

    n_fft: int = Field(ge=256, le=16384, description="STFT size (hop 1024, periodic Hann window).")
    dim_f: int = Field(ge=16, le=8193, description="Frequency bins the model takes (the lowest ones).")
    dim_t: int = Field(ge=8, le=2048, description="STFT frames per chunk.")
    compensate: float = Field(1.0, gt=0.5, lt=2.0, description="The secondary stem is mix - primary * compensate.")
    primary: Primary = Field(description="The stem the model outputs (UVR's primary stem, in lower case).")

    @model_validator(mode="after")
    def _fits(self) -> MdxParams:
        if self.n_fft < 2 * HOP:
            raise ValueError(f"n_fft {self.n_fft} is under twice the hop ({HOP}): its windows would not overlap")
        if self.dim_f > self.n_fft // 2 + 1:
            raise ValueError(f"dim_f {self.dim_f} is more than n_fft {self.n_fft} has bins ({self.n_fft // 2 + 1})")
        if self.chunk <= 2 * self.trim:
            raise ValueError(f"dim_t {self.dim_t} is too short for n_fft {self.n_fft} (nothing left after trimming)")
        return self

    @property
    def chunk(self) -> int:
        """Samples per chunk: ``dim_t`` frames at hop 1024."""
        return HOP * (self.dim_t - 1)

    @property
    def trim(self) -> int:
        """Samples dropped at each end of a chunk's output (the model's edges)."""
        return self.n_fft // 2

    @property
    def step(self) -> int:
        """The kept samples per chunk, and the stride between chunks."""
        return self.chunk - 2 * self.trim

    def check_kind(self, kind: MdxKind) -> None:
        if self.primary not in PRIMARY_FOR[kind]:
            allowed = " or ".join(PRIMARY_FOR[kind])
            raise CoverError(
                ErrorCode.OPTIONS_INVALID, f"a {kind.value} model's primary stem is {allowed}, not {self.primary}"
            )


class KnownModel(MdxParams):
    name: str
    kind: MdxKind


class MdxModelInfo(BaseModel):
    """``separation/mdx/{kind}.json`` beside the model: what it is, where its parameters came from."""

    kind: MdxKind
    name: str = Field(description="The model's file name as added (or its name in the known-model table).")
    uvr_hash: str = Field(pattern="^[0-9a-f]{32}$")
    params: MdxParams
    params_from: Literal["known", "given"] = Field(
        description="known: found by the file's UVR hash in mdx_models.json; given: --mdx-params"
    )


def uvr_hash(path: Path) -> str:
    """The MD5 of the file's last 10 000 KiB (the whole file when smaller): UVR's model key."""
    with open(path, "rb") as f:
        size = f.seek(0, 2)
        f.seek(max(0, size - UVR_HASH_TAIL))
        return hashlib.md5(f.read(), usedforsecurity=False).hexdigest()


@cache
def known_models() -> dict[str, KnownModel]:
    raw = json.loads(KNOWN_MODELS_FILE.read_text())
    return {digest: KnownModel.model_validate(entry) for digest, entry in raw.items()}


def parse_params(text: str) -> MdxParams:
    """``n_fft=5120,dim_f=2048,dim_t=256,compensate=1.035,primary=instrumental`` -> :class:`MdxParams`
    (``options.invalid`` naming what is wrong)."""
    values: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise CoverError(ErrorCode.OPTIONS_INVALID, f"--mdx-params: expected NAME=VALUE, got {item!r}")
        values[key.strip().replace("-", "_")] = value.strip()
    try:
        return MdxParams.model_validate(values)
    except ValidationError as exc:
        said = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'params'}: {e['msg']}" for e in exc.errors())
        raise CoverError(ErrorCode.OPTIONS_INVALID, f"--mdx-params: {said}") from None


def params_for(path: Path, kind: MdxKind, given: MdxParams | None) -> tuple[MdxParams, str, Literal["known", "given"]]:
    """(parameters, name, where they came from) of the model file ``path``: the given ones, else the
    known table's by the file's UVR hash; an unknown model without parameters is refused."""
    digest = uvr_hash(path)
    known = known_models().get(digest)
    if given is not None:
        given.check_kind(kind)
        return given, path.name, "given"
    if known is None:
        raise CoverError(
            ErrorCode.MODEL_MISMATCH,
            f"{path.name} is not a model we know (UVR hash {digest}): give its parameters with --mdx-params "
            "n_fft=N,dim_f=N,dim_t=N,compensate=X,primary=STEM (from the model's publisher or UVR's model_data.json)",
        )
    if known.kind is not kind:
        raise CoverError(
            ErrorCode.OPTIONS_INVALID, f"{path.name} is {known.name}, a {known.kind.value} model, not {kind.value}"
        )
    return MdxParams.model_validate(known.model_dump(include=set(MdxParams.model_fields))), known.name, "known"
