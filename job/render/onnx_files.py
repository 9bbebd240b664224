"""ONNX files from outside the process (a user's MDX-Net model, an int8 decoder another runner
shared through the bucket), checked before ONNX Runtime opens them."""

from __future__ import annotations

from typing import Any

from shared.errors import CoverError, ErrorCode


def parse_self_contained(raw: bytes, name: str) -> Any:
    """``raw`` parsed as an ONNX model (``onnx.ModelProto``), refused when it is malformed
    (``model.corrupt``) or keeps tensors in external files (``model.unsafe``: ONNX Runtime would read
    any file the model names)."""
    import onnx
    from google.protobuf.message import DecodeError

    try:
        proto = onnx.load_model_from_string(raw)
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise CoverError(ErrorCode.MODEL_CORRUPT, f"{name} is not a valid ONNX model: {exc}") from None
    tensors = list(proto.graph.initializer)
    for node in proto.graph.node:
        tensors += [a.t for a in node.attribute if a.HasField("t")]
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in tensors):  # before the checker looks for them
        raise CoverError(ErrorCode.MODEL_UNSAFE, f"{name} keeps tensors in external files: only self-contained models")
    try:
        onnx.checker.check_model(proto)
    except (onnx.checker.ValidationError, ValueError, RuntimeError) as exc:
        raise CoverError(ErrorCode.MODEL_CORRUPT, f"{name} is not a valid ONNX model: {exc}") from None
    return proto
