"""The registry of TTA operations: one entry per op, each carrying every fact a view needs about it.

An op is a frozen dataclass subclassing ``TTAOp`` and registered under the pattern its name matches in a view
string. It says how it changes the image (``apply``), where a point lands (``map_points``), what undoes it
(``inverse``) and the size of its output (``out_size``). Adding an op is one class here, decorated with
``@register_op(pattern)``, plus its test; parsing, composition, box inverses and batching pick it up.

Sizes are ``(width, height)`` pairs (``Size``): an image batch is (B, C, height, width). Coordinates are continuous
pixel coordinates on ``[0, W] x [0, H]`` (see the package docstring), so a flip maps ``x -> W - x``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, ClassVar, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

DEFAULT_SIZE_MULTIPLE = 32

Coords = TypeVar("Coords", Tensor, np.ndarray)  # a column of x or y coordinates
Size = tuple[int, int]  # (width, height)


class TTAOp:
    """One step of a view. Subclasses are frozen dataclasses; the defaults here are those of the identity."""

    # how the op is written in a view, for the list of known views in errors, e.g. ("rot90_1", "rot90_2", ...)
    spellings: ClassVar[tuple[str, ...]] = ()
    # the spellings are fixed view names (part of BASIC_VIEWS) rather than a template like scale<f>
    basic: ClassVar[bool] = True

    @classmethod
    def from_match(cls, match: re.Match[str]) -> TTAOp:
        """The op for a view part that fullmatched the registered pattern; ValueError if the values are bad."""
        return cls()

    # True for an op whose view of a W x H image is H x W (quarter turns, transpose): a non-square input then needs a
    # model that takes the swapped size too
    swaps_axes: ClassVar[bool] = False

    @property
    def changes_size(self) -> bool:
        return False

    def out_size(self, size: Size, size_multiple: int) -> Size:
        """The (width, height) of the output for a ``size`` = (width, height) input; a resizing op rounds each
        side to ``size_multiple``."""
        return size

    def apply(self, images: Tensor, new_size: Size) -> Tensor:
        """``images`` (B, C, H, W) after the op; ``new_size`` is ``out_size`` of (W, H)."""
        return images

    def map_points(self, x: Coords, y: Coords, s_in: Size, s_out: Size) -> tuple[Coords, Coords]:
        """Where the point (x, y) of the ``s_in`` = (width, height) frame lands in the ``s_out`` frame."""
        return x, y

    def inverse(self) -> TTAOp:
        """The op that takes the output frame back to the input frame, used with the sizes swapped
        (``inverse().map_points(x, y, s_out, s_in)``). Flips are their own inverses."""
        return self


# pattern (fullmatched against one '+'-separated part of a view) -> op class, in registration order
REGISTRY: dict[str, type[TTAOp]] = {}


OpClass = TypeVar("OpClass", bound=type)


def register_op(pattern: str) -> Callable[[OpClass], OpClass]:
    """Class decorator: views whose part fullmatches ``pattern`` are parsed by ``cls.from_match``."""
    re.compile(pattern)  # a bad pattern fails at import, not at the first view that reaches it

    def add(cls: OpClass) -> OpClass:
        if pattern in REGISTRY:
            raise ValueError(f"TTA op pattern {pattern!r} is already registered to {REGISTRY[pattern].__name__}")
        REGISTRY[pattern] = cls
        return cls
    return add


def parse_op(part: str) -> TTAOp | None:
    """The registered op that ``part`` names, or None. Raises ValueError for a known op with bad values."""
    for pattern, cls in REGISTRY.items():
        match = re.fullmatch(pattern, part)
        if match:
            return cls.from_match(match)
    return None


def known_spellings() -> list[str]:
    return [s for cls in REGISTRY.values() for s in cls.spellings]


def basic_views() -> tuple[str, ...]:
    """The view names of the registered ops that are written as fixed names (all but scale<f>)."""
    return tuple(s for cls in REGISTRY.values() if cls.basic for s in cls.spellings)


def scaled_size(size: int, factor: float, size_multiple: int = DEFAULT_SIZE_MULTIPLE) -> int:
    """``size * factor`` to the nearest multiple of ``size_multiple`` (halves round up), at least one multiple."""
    # half up, not Python's half-to-even: scale1.25 of 64 (80, 2.5 multiples of 32) should enlarge, to 96
    return max(size_multiple, int(size * factor / size_multiple + 0.5) * size_multiple)


# ------------------------------------------------------------------------------------------------ the ops
# Registration order is the order of BASIC_VIEWS and of the known views listed in errors.


@register_op(r"none")
@dataclass(frozen=True)
class Identity(TTAOp):
    spellings = ("none",)


@register_op(r"hflip")
@dataclass(frozen=True)
class HFlip(TTAOp):
    """Mirror left-right."""

    spellings = ("hflip",)

    def apply(self, images: Tensor, new_size: Size) -> Tensor:
        return images.flip(-1)

    def map_points(self, x: Coords, y: Coords, s_in: Size, s_out: Size) -> tuple[Coords, Coords]:
        return s_in[0] - x, y


@register_op(r"vflip")
@dataclass(frozen=True)
class VFlip(TTAOp):
    """Mirror top-bottom."""

    spellings = ("vflip",)

    def apply(self, images: Tensor, new_size: Size) -> Tensor:
        return images.flip(-2)

    def map_points(self, x: Coords, y: Coords, s_in: Size, s_out: Size) -> tuple[Coords, Coords]:
        return x, s_in[1] - y


@register_op(r"rot90_([123])")
@dataclass(frozen=True)
class Rot90(TTAOp):
    """``k`` quarter turns with ``torch.rot90(images, k, dims=(-2, -1))``: counter-clockwise as displayed
    (row 0 at the top), so the top-right corner goes to the top-left and (x, y) -> (y, W - x) for one turn of a
    W x H image. An odd ``k`` swaps width and height: a W x H input gives an H x W view."""

    k: int
    spellings = ("rot90_1", "rot90_2", "rot90_3")

    @classmethod
    def from_match(cls, match: re.Match[str]) -> TTAOp:
        return cls(int(match.group(1)))

    @property
    def swaps_axes(self) -> bool:
        return self.k % 2 == 1

    def out_size(self, size: Size, size_multiple: int) -> Size:
        return (size[1], size[0]) if self.swaps_axes else size

    def apply(self, images: Tensor, new_size: Size) -> Tensor:
        return torch.rot90(images, self.k, dims=(-2, -1))

    def map_points(self, x: Coords, y: Coords, s_in: Size, s_out: Size) -> tuple[Coords, Coords]:
        w, h = s_in
        return [(x, y), (y, w - x), (w - x, h - y), (h - y, x)][self.k % 4]

    def inverse(self) -> TTAOp:
        return Rot90((4 - self.k) % 4)


@register_op(r"transpose")
@dataclass(frozen=True)
class Transpose(TTAOp):
    """Swap x and y (mirror about the main diagonal): a W x H input gives an H x W view."""

    spellings = ("transpose",)
    swaps_axes = True

    def out_size(self, size: Size, size_multiple: int) -> Size:
        return size[1], size[0]

    def apply(self, images: Tensor, new_size: Size) -> Tensor:
        return images.transpose(-1, -2)

    def map_points(self, x: Coords, y: Coords, s_in: Size, s_out: Size) -> tuple[Coords, Coords]:
        return y, x


@register_op(r"scale(\d+(?:\.\d+)?|\.\d+)")
@dataclass(frozen=True)
class Scale(TTAOp):
    """Bilinear resize (``align_corners=False``, no antialias: OpenCV's ``INTER_LINEAR`` sampling) of a W x H
    image to ``scaled_size(W, factor, m)`` x ``scaled_size(H, factor, m)``: both sides by the same factor, each
    rounded to the model's size multiple ``m``. Points move by each axis's realised ratio (``W' / W``, ``H' / H``),
    not ``factor``, so the box map stays exact after the rounding."""

    factor: float
    spellings = ("scale<f> (e.g. scale0.8)",)
    basic = False

    @classmethod
    def from_match(cls, match: re.Match[str]) -> TTAOp:
        factor = float(match.group(1))
        if factor <= 0:
            raise ValueError(f"a scale factor must be > 0, got {match.group(1)}")
        return cls(factor)

    @property
    def changes_size(self) -> bool:
        return True

    def out_size(self, size: Size, size_multiple: int) -> Size:
        return scaled_size(size[0], self.factor, size_multiple), scaled_size(size[1], self.factor, size_multiple)

    def apply(self, images: Tensor, new_size: Size) -> Tensor:
        width, height = new_size
        if (height, width) == tuple(images.shape[-2:]):
            return images
        return F.interpolate(images, size=(height, width), mode="bilinear", align_corners=False, antialias=False)

    def map_points(self, x: Coords, y: Coords, s_in: Size, s_out: Size) -> tuple[Coords, Coords]:
        if s_in == s_out:
            return x, y
        # each axis alone: an unchanged axis keeps its coordinates bit for bit
        x = x if s_in[0] == s_out[0] else x * s_out[0] / s_in[0]
        y = y if s_in[1] == s_out[1] else y * s_out[1] / s_in[1]
        return x, y

    # inverse: itself; with the sizes swapped map_points scales by W / W' and H / H'
