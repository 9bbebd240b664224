"""Building a network around a checkpoint's weights: without a second copy of them, without
running its random initialisation, and without allocating more than a limit.

``Module()`` then ``load_state_dict`` holds three sets of weights at once: the module's random
initial ones, the checkpoint's, and (for a half-precision file) the float32 copies made for the
load. Loading RMVPE's 172 MB half-precision file that way peaked 520 MB above what it left resident
(345 MB); HuBERT's 361 MB float32 file peaked 370 MB above. :func:`build_unfilled` makes the module
with torch's random initialisers skipped: its tensors are allocated but never written, so their
pages are not resident, and :func:`fill` hands it the checkpoint's tensors themselves (``assign``),
converted to float32 one at a time where they are not already, each source tensor dropped as it is
converted. Each tensor the module's construction asks for is sized (on the ``meta`` device, torch's
C++ shape functions) before it is allocated: a declaration past ``limit_bytes`` is refused with
nothing allocated.

Not on the ``meta`` device as a whole: initialisation code run there goes through torch's Python
reference implementations (``normal_``, ``cumsum``, elementwise arithmetic), and the first of them
imports ``torch._dynamo`` (sympy and some 800 modules): 1.2 to 1.4 s of every process that loaded
a model, each Cloud Run execution's start among them.

A float32 safetensors file (a transformers HuBERT folder) is mapped by safetensors, so its tensors
become the network's parameters as the file's pages: read on first use, shared through the page
cache by every process on the machine, given back under memory pressure. The model store replaces
files by renaming (never rewriting in place), so a mapped file never changes under a running
network.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

M = TypeVar("M", bound=nn.Module)

# torch's random (and constant) initialisers: skipped, the checkpoint replaces what they would write
_INITIALISERS: frozenset[Callable[..., Any]] = frozenset(
    getattr(torch.nn.init, name)
    for name in (
        "normal_",
        "uniform_",
        "trunc_normal_",
        "kaiming_uniform_",
        "kaiming_normal_",
        "xavier_uniform_",
        "xavier_normal_",
        "orthogonal_",
        "constant_",
        "zeros_",
        "ones_",
    )
) | frozenset((torch.Tensor.normal_, torch.Tensor.uniform_))
# the constructors that make parameters and buffers, sized before they allocate (the others,
# ``arange``, ``linspace``, ``tensor``, make the small tables initialisation code computes with)
_SIZED: frozenset[Callable[..., Any]] = frozenset(
    (torch.empty, torch.zeros, torch.ones, torch.full, torch.rand, torch.randn, torch.randint, torch.empty_strided)
)


class TooLargeError(RuntimeError):
    """A module's construction asked for more memory than its limit (nothing past it allocated)."""


def room_for(state: dict[str, Any]) -> int:
    """The bytes a module built for ``state`` may ask for while it is constructed: twice the state's
    tensors in float32 (what initialisation code computes beside them), and 64 MB."""
    held = sum(t.numel() for t in state.values() if isinstance(t, torch.Tensor))
    return 2 * 4 * held + (64 << 20)


class _Construction(TorchFunctionMode):
    """Skips the initialisers (remembering their tensors) and sizes each constructor's tensor
    before it allocates. Thread-local, as torch's function modes are."""

    def __init__(self, limit_bytes: int | None) -> None:
        super().__init__()
        self.limit_bytes, self.allocated = limit_bytes, 0
        self.unwritten: list[weakref.ref[torch.Tensor]] = []

    def __torch_function__(
        self, func: Callable[..., Any], types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        if func in _INITIALISERS:
            tensor = args[0] if args else kwargs["tensor"]
            self.unwritten.append(weakref.ref(tensor))
            return tensor
        if func in _SIZED and self.limit_bytes is not None:
            shape = func(*args, **{**kwargs, "device": "meta"})
            self.allocated += shape.numel() * shape.element_size()
            if self.allocated > self.limit_bytes:
                raise TooLargeError(f"its construction asks for more than {self.limit_bytes / 2**20:.0f} MB")
        return func(*args, **kwargs)


@dataclass
class Unfilled(Generic[M]):
    """A module as :func:`build_unfilled` made it, and the tensors it left unwritten."""

    module: M
    unwritten: list[weakref.ref[torch.Tensor]]

    def holds_unwritten(self) -> list[str]:
        """The names of the module's tensors that no one has written yet."""
        tensors = (*self.module.named_parameters(), *self.module.named_buffers())
        return [name for name, t in tensors if any(ref() is t for ref in self.unwritten)]


def build_unfilled(factory: Callable[[], M], limit_bytes: int | None = None) -> Unfilled[M]:
    """``factory()``'s module, its random initialisation skipped (its ``state_dict()`` has the
    declared shapes). Raises :class:`TooLargeError` when its tensors would pass ``limit_bytes`` (checked
    before each is allocated), and whatever ``factory`` raises."""
    construction = _Construction(limit_bytes)
    with construction:
        module = factory()
    return Unfilled(module, construction.unwritten)


def fill(unfilled: Unfilled[M], state: dict[str, torch.Tensor]) -> M:
    """The module holding ``state``'s tensors (floating ones as float32), in eval mode. ``state`` is
    emptied as its tensors are taken. Raises ``RuntimeError`` (``load_state_dict``'s, strict) when
    keys or shapes do not fit; the module then holds nothing usable."""
    model = unfilled.module
    weights: dict[str, torch.Tensor] = {}
    for key in list(state):
        tensor = state.pop(key)
        weights[key] = tensor.float() if tensor.is_floating_point() else tensor
        del tensor  # a converted half-precision tensor is freed here, not after the whole load
    model.load_state_dict(weights, strict=True, assign=True)
    left = unfilled.holds_unwritten()
    if left:  # a tensor the module initialises itself rather than saves: this way cannot build it
        raise RuntimeError(f"not in the checkpoint and not saved by the module: {', '.join(left[:3])}")
    return model.eval()


def build_with_weights(factory: Callable[[], M], state: dict[str, torch.Tensor]) -> M:
    """``factory()``'s module holding ``state``'s tensors: :func:`build_unfilled` (within
    :func:`room_for` the state), then :func:`fill`."""
    return fill(build_unfilled(factory, room_for(state)), state)
