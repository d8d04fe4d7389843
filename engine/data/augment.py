"""RandAugment and random erasing, as the reference's ImageNet fine-tuning applies them.

data2vec 2.0's (and MAE's) fine-tuning builds its training transform with timm's ``create_transform(
auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25, re_mode="pixel", re_count=1, interpolation="bicubic")``:
RandomResizedCrop + flip, RandAugment on the 8-bit image, normalisation, then random erasing on the
normalised tensor. Both are written here with Pillow and torch, and draw all their randomness from the
per-sample ``torch.Generator`` the transform receives, so a sample's augmentation is a pure function of
its seed (exact resume, any number of workers), as for the crop.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps

from .images import IMAGENET_MEAN

EXAMPLE_SPEC = "rand-m9-mstd0.5-inc1"
MAX_MAGNITUDE = 10.0
"""Magnitudes are clipped to [0, 10] and every op reaches its strongest setting at 10 (timm's _LEVEL_DENOM)."""
RESAMPLE = Image.BICUBIC
"""Geometric ops resample bicubically: the reference passes interpolation="bicubic" to create_transform,
which hands it to RandAugment (timm draws bilinear or bicubic at random only when it is unset)."""


# -- the ops: Pillow on an RGB image, each with the value its magnitude maps to -----------------------


def _affine(img: Image.Image, coeffs: tuple, fill: tuple) -> Image.Image:
    return img.transform(img.size, Image.AFFINE, coeffs, resample=RESAMPLE, fillcolor=fill)


def _solarize_add(img: Image.Image, add: float, fill: tuple) -> Image.Image:
    """Add ``add`` to the pixels below 128 (saturating), leave the rest."""
    lut = [min(255, i + int(add)) if i < 128 else i for i in range(256)]
    return img.point(lut * len(img.getbands()))


def _posterize(img: Image.Image, bits: float, fill: tuple) -> Image.Image:
    """Keep the ``bits`` high bits of each channel; 0 bits is black (Pillow's own posterize refuses 0)."""
    mask = (0xFF << (8 - min(8, max(0, int(bits))))) & 0xFF
    return img.point([i & mask for i in range(256)] * len(img.getbands()))


def _enhancer(kind) -> Callable:
    def enhance(img: Image.Image, factor: float, fill: tuple) -> Image.Image:
        return kind(img).enhance(factor)

    return enhance


def _increasing_enhancer(kind) -> Callable:
    """The increasing variant's value is the signed distance from the identity factor 1."""
    def enhance(img: Image.Image, delta: float, fill: tuple) -> Image.Image:
        return kind(img).enhance(1.0 + delta)

    return enhance


@dataclass(frozen=True)
class Op:
    """``apply(img, value, fill)`` with ``value = level(magnitude)``, negated half the time when ``signed``."""

    apply: Callable[[Image.Image, float, tuple], Image.Image]
    level: Callable[[float], float] = lambda m: 0.0
    signed: bool = False


def _scaled(top: float, bottom: float = 0.0) -> Callable[[float], float]:
    """Magnitude 0..10 -> bottom..bottom + top, linearly."""
    return lambda m: bottom + m / MAX_MAGNITUDE * top


def _steps(top: int, reverse: bool = False) -> Callable[[float], float]:
    """Magnitude 0..10 -> int(0..top), or top minus that when ``reverse``."""
    return lambda m: top - int(m / MAX_MAGNITUDE * top) if reverse else int(m / MAX_MAGNITUDE * top)


def _solarize(img: Image.Image, threshold: float, fill: tuple) -> Image.Image:
    return ImageOps.solarize(img, int(threshold))


OPS: dict[str, Op] = {
    "AutoContrast": Op(lambda img, v, fill: ImageOps.autocontrast(img)),
    "Equalize": Op(lambda img, v, fill: ImageOps.equalize(img)),
    "Invert": Op(lambda img, v, fill: ImageOps.invert(img)),
    "Rotate": Op(lambda img, deg, fill: img.rotate(deg, resample=RESAMPLE, fillcolor=fill), _scaled(30.0), True),
    "ShearX": Op(lambda img, s, fill: _affine(img, (1, s, 0, 0, 1, 0), fill), _scaled(0.3), True),
    "ShearY": Op(lambda img, s, fill: _affine(img, (1, 0, 0, s, 1, 0), fill), _scaled(0.3), True),
    "TranslateXRel": Op(lambda img, t, fill: _affine(img, (1, 0, t * img.size[0], 0, 1, 0), fill), _scaled(0.45), True),
    "TranslateYRel": Op(lambda img, t, fill: _affine(img, (1, 0, 0, 0, 1, t * img.size[1]), fill), _scaled(0.45), True),
    "SolarizeAdd": Op(_solarize_add, _steps(110)),
    # inc1: stronger with the magnitude (fewer bits kept, a lower threshold, a factor further from 1)
    "PosterizeIncreasing": Op(_posterize, _steps(4, reverse=True)),
    "SolarizeIncreasing": Op(_solarize, _steps(256, reverse=True)),
    "ColorIncreasing": Op(_increasing_enhancer(ImageEnhance.Color), _scaled(0.9), True),
    "ContrastIncreasing": Op(_increasing_enhancer(ImageEnhance.Contrast), _scaled(0.9), True),
    "BrightnessIncreasing": Op(_increasing_enhancer(ImageEnhance.Brightness), _scaled(0.9), True),
    "SharpnessIncreasing": Op(_increasing_enhancer(ImageEnhance.Sharpness), _scaled(0.9), True),
    # inc0: the original RandAugment mappings, where a larger magnitude is not always a stronger change
    # (0 bits of posterize is a black image, a threshold of 256 solarizes nothing, factors run 0.1 -> 1.9)
    "Posterize": Op(_posterize, _steps(4)),
    "Solarize": Op(_solarize, _steps(256)),
    "Color": Op(_enhancer(ImageEnhance.Color), _scaled(1.8, 0.1)),
    "Contrast": Op(_enhancer(ImageEnhance.Contrast), _scaled(1.8, 0.1)),
    "Brightness": Op(_enhancer(ImageEnhance.Brightness), _scaled(1.8, 0.1)),
    "Sharpness": Op(_enhancer(ImageEnhance.Sharpness), _scaled(1.8, 0.1)),
}
_FIRST = ("AutoContrast", "Equalize", "Invert", "Rotate")
_GEOMETRIC = ("ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
INCREASING = (*_FIRST, "PosterizeIncreasing", "SolarizeIncreasing", "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing",
              "BrightnessIncreasing", "SharpnessIncreasing", *_GEOMETRIC)  # fmt: skip
"""The ops of inc1, in timm's order (_RAND_INCREASING_TRANSFORMS; the op drawn is an index into this list)."""
STANDARD = (*_FIRST, "Posterize", "Solarize", "SolarizeAdd", "Color", "Contrast", "Brightness", "Sharpness", *_GEOMETRIC)
"""The ops of inc0, in timm's order (_RAND_TRANSFORMS)."""


def apply_op(img: Image.Image, name: str, magnitude: float, negate: bool = False, fill: tuple = (128, 128, 128)):
    """One op at ``magnitude`` (clipped to [0, 10]); ``negate`` flips the sign of a signed op's value."""
    op = OPS[name]
    value = op.level(min(max(magnitude, 0.0), MAX_MAGNITUDE))
    return op.apply(img, -value if op.signed and negate else value, fill)


# -- RandAugment --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RandAugmentSpec:
    """A parsed ``rand-m{magnitude}[-n{num_ops}][-mstd{std}][-inc{0|1}][-p{prob}]``."""

    magnitude: int
    num_ops: int = 2
    magnitude_std: float = 0.0
    """Each op's magnitude is drawn from normal(magnitude, std); above 100, uniform in [0, magnitude]."""
    increasing: bool = False
    prob: float = 0.5
    """Probability that each drawn op is applied."""


def parse_rand_augment(spec: str, name: str = "RandAugment spec") -> RandAugmentSpec:
    """Parse timm's RandAugment string, or raise a one-line ValueError naming ``name`` and the bad part.

    Unlike timm, ``inc0`` selects the original (non-increasing) ops: timm tests ``bool("0")``, which is
    True, so there any ``inc`` section means the increasing list. The reference's spec says inc1.
    """
    def bad(part: str, why: str) -> ValueError:
        return ValueError(f"{name} {spec!r}: {part!r} {why}; e.g. {EXAMPLE_SPEC} "
                          "(rand-m<0..10>[-n<ops>][-mstd<std>][-inc<0|1>][-p<prob>])")  # fmt: skip

    parts = spec.split("-")
    if parts[0] != "rand":
        raise bad(parts[0], "must be 'rand'")
    values: dict[str, float] = {}
    for part in parts[1:]:
        match = _SECTION.fullmatch(part)
        if match is None or match.group(1) not in _KEYS:
            raise bad(part, "is not one of m<int>, n<int>, mstd<float>, inc<0|1>, p<float>")
        key, text = match.groups()
        kind, valid, why = _KEYS[key]
        try:
            value = kind(text)
        except ValueError:
            raise bad(part, f"needs {'an integer' if kind is int else 'a number'} after {key!r}") from None
        if not valid(value):
            raise bad(part, why)
        values[key] = value
    if "m" not in values:
        raise bad(spec, "gives no magnitude m<0..10>")
    return RandAugmentSpec(values["m"], values.get("n", 2), values.get("mstd", 0.0), bool(values.get("inc", 0)),
                           values.get("p", 0.5))  # fmt: skip


_SECTION = re.compile(r"([a-z]+)(\d.*)")
_KEYS = {  # key -> (type, valid?, what valid is)
    "m": (int, lambda v: 0 <= v <= MAX_MAGNITUDE, "must lie in 0..10"),
    "n": (int, lambda v: v >= 1, "must be >= 1"),
    "mstd": (float, lambda v: v >= 0, "must be >= 0"),
    "inc": (int, lambda v: v in (0, 1), "must be 0 or 1"),
    "p": (float, lambda v: 0 <= v <= 1, "must lie in [0, 1]"),
}


def to_pil(img: torch.Tensor) -> Image.Image:
    """Float [3, H, W] in [0, 1] -> an 8-bit RGB image (what timm's ops see after its PIL crop)."""
    arr = img.mul(255.0).round_().clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
    return Image.fromarray(arr, "RGB")


def from_pil(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)


class RandAugment:
    """``num_ops`` ops drawn uniformly with replacement, each applied with probability ``prob`` at a
    magnitude drawn per op: ``transform(img, generator)`` on a float [3, H, W] in [0, 1].

    ``fill`` is what geometric ops uncover: the mean colour, as create_transform sets timm's ``img_mean``
    (round(255 x the normalisation mean); timm's own default, used without create_transform, is 128 gray).
    """

    def __init__(self, spec: str | RandAugmentSpec, mean: Sequence[float] = IMAGENET_MEAN):
        self.spec = parse_rand_augment(spec) if isinstance(spec, str) else spec
        self.ops = INCREASING if self.spec.increasing else STANDARD
        self.fill = tuple(min(255, round(255 * c)) for c in mean)

    def magnitude(self, normal: float, uniform: float) -> float:
        m, std = float(self.spec.magnitude), self.spec.magnitude_std
        if std > 100:
            return uniform * m
        return m + std * normal if std > 0 else m

    def __call__(self, img: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        n = self.spec.num_ops
        # Everything is drawn up front, used or not, so the stream's length does not depend on the ops.
        chosen = torch.randint(len(self.ops), (n,), generator=generator).tolist()
        u = torch.rand(n, 3, generator=generator).tolist()  # apply?, sign, uniform magnitude
        z = torch.randn(n, generator=generator).tolist()
        pil = to_pil(img)
        for i in range(n):
            if u[i][0] < self.spec.prob:
                pil = apply_op(pil, self.ops[chosen[i]], self.magnitude(z[i], u[i][2]), u[i][1] < 0.5, self.fill)
        return from_pil(pil)


# -- random erasing -----------------------------------------------------------------------------------


class RandomErasing:
    """With probability ``prob``, one rectangle of ``area`` (fraction, uniform) and aspect ratio (log-uniform
    in [min_aspect, 1 / min_aspect]) replaced by per-pixel N(0, 1) noise: timm's mode "pixel", count 1, on
    the normalised tensor. Ten tries to fit the image; none fitting leaves it as it is."""

    def __init__(self, prob: float, area: Sequence[float] = (0.02, 1 / 3), min_aspect: float = 0.3):
        if not 0 <= prob <= 1:
            raise ValueError(f"random erasing probability must lie in [0, 1], got {prob}")
        self.prob, self.area = prob, tuple(area)
        self.log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))

    def __call__(self, img: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if torch.rand(1, generator=generator).item() >= self.prob:
            return img
        channels, height, width = img.shape
        for _ in range(10):
            u = torch.rand(4, generator=generator).tolist()
            target = (self.area[0] + (self.area[1] - self.area[0]) * u[0]) * height * width
            aspect = math.exp(self.log_aspect[0] + (self.log_aspect[1] - self.log_aspect[0]) * u[1])
            h, w = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
            if 0 < h < height and 0 < w < width:
                top, left = int(u[2] * (height - h + 1)), int(u[3] * (width - w + 1))
                img = img.clone()
                img[:, top : top + h, left : left + w] = torch.randn(channels, h, w, generator=generator, dtype=img.dtype)
                return img
        return img
