"""``cover models add FILE.onnx --kind karaoke|dereverb``: an MDX-Net model into the store.

The file is checked before anything is written: its parameters found by its UVR hash or given
(``--mdx-params``), the ONNX parsed and loaded by ONNX Runtime, its input shape matched against
the parameters. The model and its ``.json`` enter ``separation/mdx/`` by rename, the ``.json``
last (the store sees a kind only when both are there); ``cover models push`` publishes them with
the other base models.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

from job.render.media.download import UrlPolicy, download, is_url
from job.render.separate.mdx import MdxModel
from job.render.separate.mdx_params import MdxKind, MdxModelInfo, params_for, parse_params, uvr_hash
from shared.errors import CoverError, ErrorCode
from shared.model_store import ModelStore
from shared.names import safe_file_name


def add_separation_model(
    store: ModelStore,
    source: str,
    kind: MdxKind,
    params_text: str | None,
    replace: bool,
    policy: UrlPolicy,
) -> MdxModelInfo:
    """Check ``source`` (a path or an http(s) URL) and install it as the store's ``kind`` model.

    Args:
        store: the model store
        source: the ``.onnx`` file, a path or a URL
        kind: what it separates (karaoke: lead and backing; dereverb: dry voice and reverb)
        params_text: ``--mdx-params`` (None: the known table's, by the file's UVR hash)
        replace: replace the store's model of that kind
        policy: the URL guard for a URL source
    """
    onnx_path, info_path = store.mdx_paths(kind.value)
    if onnx_path.exists() and not replace:
        raise CoverError(
            ErrorCode.OPTIONS_INVALID,
            f"the store already has a {kind.value} model ({onnx_path}); --replace replaces it",
        )
    given = parse_params(params_text) if params_text else None
    onnx_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=onnx_path.parent, prefix=".add-") as tmp:
        staged = Path(tmp) / "model.onnx"
        if is_url(source):
            download(source, staged, policy)
            name = safe_file_name(urlsplit(source).path, "model.onnx")
        else:
            local = Path(source).expanduser()
            if not local.is_file():
                raise CoverError(ErrorCode.INPUT_NOT_FOUND, f"model file not found: {local}")
            shutil.copyfile(local, staged)
            name = local.name
        params, known_name, origin = params_for(staged, kind, given)
        MdxModel(staged, params, threads=1)  # parses, checks the input's shape, and loads: or refuses
        info = MdxModelInfo(
            kind=kind,
            name=known_name if origin == "known" else name,
            uvr_hash=uvr_hash(staged),
            params=params,
            params_from=origin,
        )
        staged_info = Path(tmp) / "model.json"
        staged_info.write_text(info.model_dump_json(indent=2))
        info_path.unlink(missing_ok=True)  # a replaced kind is absent, never half old and half new
        os.replace(staged, onnx_path)
        os.replace(staged_info, info_path)
    return info
