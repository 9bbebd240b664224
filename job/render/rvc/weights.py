"""Building a network around a checkpoint's weights without a second copy of them.

``Module()`` then ``load_state_dict`` holds three sets of weights at once: the module's random
initial ones, the checkpoint's, and (for a half-precision file) the float32 copies made for the
load. Loading RMVPE's 172 MB half-precision file that way peaked 520 MB above what it left resident
(345 MB); HuBERT's 361 MB float32 file peaked 370 MB above. :func:`build_with_weights` makes the
module on the ``meta`` device (shapes only: no memory, no random initialisation) and hands it the
checkpoint's tensors themselves, converted to float32 one at a time where they are not already,
each source tensor dropped as it is converted.

A float32 safetensors file (a transformers HuBERT folder) is mapped by safetensors, so its tensors
become the network's parameters as the file's pages: read on first use, shared through the page
cache by every process on the machine, given back under memory pressure. The model store replaces
files by renaming (never rewriting in place), so a mapped file never changes under a running
network.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch
from torch import nn

M = TypeVar("M", bound=nn.Module)


def build_with_weights(factory: Callable[[], M], state: dict[str, torch.Tensor]) -> M:
    """``factory()``'s module holding ``state``'s tensors (floating ones as float32), in eval mode.
    ``state`` is emptied as its tensors are taken. Raises ``RuntimeError`` (``load_state_dict``'s,
    strict) when keys or shapes do not fit; the module then holds nothing usable."""
    with torch.device("meta"):
        model = factory()
    weights: dict[str, torch.Tensor] = {}
    for key in list(state):
        tensor = state.pop(key)
        weights[key] = tensor.float() if tensor.is_floating_point() else tensor
        del tensor  # a converted half-precision tensor is freed here, not after the whole load
    model.load_state_dict(weights, strict=True, assign=True)
    left = [name for name, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left:  # a tensor the module makes itself rather than saves: this way cannot build it
        raise RuntimeError(f"not in the checkpoint and not saved by the module: {', '.join(left[:3])}")
    return model.eval()
