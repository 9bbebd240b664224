"""The vocal stem split further, after Demucs, by the store's MDX-Net models: lead from backing
(the karaoke model) and the lead's dry voice from its room (the dereverb model).

Without a karaoke model the whole vocal stem is the lead (lead and backing converted together, as
before this step existed); asking for a backing mode or for de-reverb without the model is
``model.missing``. The split stems go to the stem cache under a key made of the stems they were
split from and of everything that makes their numbers (the model's digest, its parameters,
denoise), so a second voice on the same song splits nothing again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections.abc import Callable
from pathlib import Path

import torch
from pydantic import BaseModel

from job.render.compute import resolve_graph_runtime, resolve_kernels, resolve_precision
from job.render.loading import loading
from job.render.separate.mdx import MdxModel
from job.render.separate.mdx_params import MdxKind, MdxModelInfo
from job.render.separate.stems import StemCache
from shared.errors import CoverError, ErrorCode
from shared.hashing import sha256_of
from shared.model_store import ModelStore
from shared.options import BackingMode, StemOptions

log = logging.getLogger("melodia.stems")
ProgressFn = Callable[[float], None]
# the two stems each kind writes: (the primary's name, the secondary's name) by the model's primary
STEM_NAMES: dict[MdxKind, tuple[str, str]] = {MdxKind.KARAOKE: ("lead", "backing"), MdxKind.DEREVERB: ("dry", "room")}
PRIMARY_IS_FIRST = {"vocals", "no-reverb"}  # a model whose primary is the lead (or the dry voice)


class VocalStems(BaseModel):
    """What the conversion sings and what is mixed beside it."""

    lead: Path
    backing: Path | None = None
    room: Path | None = None
    backing_mode: BackingMode | None = None
    karaoke: str | None = None  # the models used, by name
    dereverb: str | None = None
    runtime: str | None = None  # what ran the MDX-Net passes (MdxModel.arithmetic)
    cached: bool = False

    def said(self) -> str:
        """How the vocal stem was used, in words (for the report)."""
        parts = []
        if self.karaoke:
            mode = self.backing_mode.value if self.backing_mode else "original"
            parts.append(f"lead and backing split by {self.karaoke}; backing {mode}")
        else:
            parts.append("lead and backing converted together (no karaoke model in the store)")
        if self.dereverb:
            parts.append(f"lead's reverb removed by {self.dereverb}" + ("; the room kept" if self.room else ""))
        if self.runtime:
            parts.append(f"run on {self.runtime}")
        return "; ".join(parts)


class LoadedMdx(BaseModel, arbitrary_types_allowed=True):
    model: MdxModel
    info: MdxModelInfo
    sha256: str


class VocalSplitter:
    """Loads the store's MDX-Net models on first use and keeps them.

    Args:
        store: the model store (``separation/mdx/``)
        threads: ONNX Runtime's threads (0: torch's)
        runtime: ``auto``, ``onnxruntime`` or ``torch`` (:func:`~job.render.compute.resolve_graph_runtime`)
        device: where torch runs them
        precision: ``auto``, ``fp32``, ``bf16`` or ``fp16`` (torch's compute type)
        kernels: ``fast`` (channels-last) or ``reference``
    """

    def __init__(
        self,
        store: ModelStore,
        threads: int = 0,
        runtime: str = "auto",
        device: torch.device | None = None,
        precision: str = "auto",
        kernels: str = "fast",
    ) -> None:
        self.store, self.threads = store, threads
        self.device = device or torch.device("cpu")
        self.dtype = resolve_precision(precision, self.device)
        self.channels_last = resolve_kernels(kernels)  # the fast layout, as Demucs takes it on every device
        self.on_torch = resolve_graph_runtime(runtime, self.channels_last)
        self._models: dict[MdxKind, LoadedMdx] = {}
        self._lock = threading.Lock()

    def available(self, kind: MdxKind) -> bool:
        return self.store.mdx_model(kind.value) is not None

    def available_any(self) -> bool:
        """Whether a cover with default options splits the vocal stem (a karaoke model is there)."""
        return self.available(MdxKind.KARAOKE)

    def model(self, kind: MdxKind) -> LoadedMdx:
        with self._lock:
            if kind not in self._models:
                found = self.store.mdx_model(kind.value)
                if found is None:
                    onnx, _ = self.store.mdx_paths(kind.value)
                    raise self.store.missing(
                        f"the {kind.value} model (MDX-Net)",
                        onnx,
                        f"or add one: cover models add FILE.onnx --kind {kind.value}",
                    )
                path, info_path = found
                try:
                    info = MdxModelInfo.model_validate_json(info_path.read_text())
                except ValueError as exc:
                    raise CoverError(ErrorCode.MODEL_CORRUPT, f"{info_path} is unreadable: {exc}") from None
                with loading(f"the {kind.value} model ({info.name})"):
                    model = MdxModel(
                        path,
                        info.params,
                        self.threads,
                        on_torch=self.on_torch,
                        device=self.device,
                        dtype=self.dtype,
                        channels_last=self.channels_last,
                    )
                    self._models[kind] = LoadedMdx(model=model, info=info, sha256=sha256_of(path))
                log.info("the %s model runs on %s", kind.value, model.arithmetic)
            return self._models[kind]

    def unload(self) -> None:
        """Drop the loaded models (the next split loads them again)."""
        with self._lock:
            self._models.clear()

    def split(
        self,
        vocals: Path,
        stem_key: str,
        audio_sha256: str,
        out_dir: Path,
        options: StemOptions,
        cache: StemCache | None = None,
        progress: ProgressFn | None = None,
    ) -> VocalStems:
        """The vocal stem's lead (and backing, and room) as ``options`` and the store's models ask.

        Args:
            vocals: the separated vocal stem
            stem_key: the separation's key (what made ``vocals``)
            audio_sha256: the song's audio digest (the stem cache's first key part)
            out_dir: where the split stems go
            options: backing, dereverb, keep_room, stem_denoise
            cache: the stem cache (None: split every time)
            progress: called with the fraction done
        """
        karaoke = options.backing is not None or self.available(MdxKind.KARAOKE)
        steps = [k for k, wanted in ((MdxKind.KARAOKE, karaoke), (MdxKind.DEREVERB, options.dereverb)) if wanted]
        stems = VocalStems(lead=vocals)
        key = stem_key
        for n, kind in enumerate(steps):
            loaded = self.model(kind)
            key = _step_key(key, kind, loaded, options.stem_denoise)
            names = STEM_NAMES[kind]
            got = cache.get_files(audio_sha256, key, names, out_dir) if cache is not None else None
            if got is None:
                primary, secondary = names if loaded.info.params.primary in PRIMARY_IS_FIRST else names[::-1]
                step = None if progress is None else (lambda f, n=n: progress((n + f) / len(steps)))
                loaded.model.split(
                    stems.lead, out_dir / f"{primary}.wav", out_dir / f"{secondary}.wav", options.stem_denoise, step
                )
                got = {name: out_dir / f"{name}.wav" for name in names}
                if cache is not None:
                    cache.put_files(audio_sha256, key, got)
            else:
                stems.cached = True
            stems.runtime = loaded.model.arithmetic
            if kind is MdxKind.KARAOKE:
                mode = options.backing or BackingMode.ORIGINAL
                stems = stems.model_copy(
                    update={
                        "lead": got["lead"],
                        "backing": got["backing"],
                        "backing_mode": mode,
                        "karaoke": loaded.info.name,
                    }
                )
            else:
                stems = stems.model_copy(
                    update={
                        "lead": got["dry"],
                        "room": got["room"] if options.keep_room else None,
                        "dereverb": loaded.info.name,
                    }
                )
        if progress:
            progress(1.0)
        return stems


def _step_key(previous: str, kind: MdxKind, loaded: LoadedMdx, denoise: bool) -> str:
    """The stem cache key of one split: the stems it splits and everything that makes its numbers."""
    made_by = {
        "from": previous,
        "kind": kind.value,
        "model_sha256": loaded.sha256,
        "params": loaded.info.params.model_dump(mode="json"),
        "denoise": denoise,
    }
    if loaded.model.arithmetic != "onnxruntime":  # the reference's keys stay those it always had
        made_by["arithmetic"] = loaded.model.arithmetic
    digest = hashlib.sha256(json.dumps(made_by, sort_keys=True).encode()).hexdigest()[:16]
    return f"{kind.value}-{digest}"
