"""Image data: an ImageFolder tree or a flat folder, read with Pillow, augmented with torch ops.

The augmentation is the one data2vec 2.0 and MAE use for pretraining: RandomResizedCrop(size,
scale=(0.2, 1.0), bicubic) + horizontal flip + ImageNet normalisation. It is written with torch
ops (no torchvision) and draws all its randomness from the generator it is given, so a sample's
augmentation is a pure function of its seed (exact resume, any number of workers).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from .base import CorruptSample

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def list_images(root: str | os.PathLike) -> tuple[list[str], list[int], list[str]]:
    """Find the images under ``root``: ``root/<class>/**/<image>`` (ImageFolder) or a flat folder.

    A tree with a ``train/`` folder (the fairseq/MAE layout) is read from ``train/``. A flat folder
    of images is one pseudo-class. Returns (paths, labels, class names), sorted for determinism.
    """
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"image folder {root} does not exist; pass --data an ImageFolder tree or a folder of images")
    if not root.is_dir():
        raise ValueError(f"image data {root} is a file; pass --data a folder of images or of class folders")
    if (root / "train").is_dir():
        root = root / "train"
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    paths: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        for dirpath, _, files in sorted(os.walk(root / name)):
            for f in sorted(files):
                if f.lower().endswith(IMAGE_EXTENSIONS):
                    paths.append(os.path.join(dirpath, f))
                    labels.append(label)
    flat = sorted(f.name for f in root.iterdir() if f.is_file() and f.name.lower().endswith(IMAGE_EXTENSIONS))
    if flat and not paths:
        classes = [root.name]
        paths = [str(root / f) for f in flat]
        labels = [0] * len(paths)
    if not paths:
        raise ValueError(
            f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {root}; expected {root}/<class>/<image> "
            "or a flat folder of images"
        )
    return paths, labels, classes


def load_rgb(path: str) -> torch.Tensor:
    """Decode an image file to a float tensor [3, H, W] in [0, 1], upright (EXIF orientation applied)."""
    with Image.open(path) as img:
        return pil_to_rgb(ImageOps.exif_transpose(img))


_HIGH_DEPTH = {"I;16": 65535.0, "I;16L": 65535.0, "I;16B": 65535.0, "I;16N": 65535.0, "I": 65535.0, "F": 1.0}
"""Modes Pillow cannot cast to 8-bit RGB without clipping, and their full-scale value: 16-bit
grayscale (and 32-bit ``I``, read as 16-bit data, which is what PNG and TIFF put there) / float."""


def pil_to_rgb(img: Image.Image) -> torch.Tensor:
    """Any Pillow mode -> float [3, H, W] in [0, 1].

    16-bit and float grayscale are scaled by their full range (``convert("RGB")`` would clip them
    to 255 and turn them white); images with transparency (RGBA, LA, PA, palettes with a transparent
    index) are composited over white, so what was hidden under alpha = 0 stays hidden; palette,
    1-bit, CMYK, YCbCr and the rest go through Pillow's own conversion to RGB.
    """
    if img.mode in _HIGH_DEPTH:
        gray = np.asarray(img).astype(np.float32) / _HIGH_DEPTH[img.mode]
        return torch.from_numpy(np.clip(gray, 0.0, 1.0)).unsqueeze(0).expand(3, -1, -1).contiguous()
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


def random_resized_crop_box(
    height: int, width: int, scale: Sequence[float], ratio: Sequence[float], generator: torch.Generator
) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a random crop covering ``scale`` of the area at aspect ``ratio``.

    Ten tries at a uniform area fraction and log-uniform aspect ratio, then a central crop at the
    nearest allowed ratio, as in the standard RandomResizedCrop.
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        u = torch.rand(4, generator=generator).tolist()
        target_area = area * (scale[0] + (scale[1] - scale[0]) * u[0])
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u[1])
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = min(int(u[2] * (height - h + 1)), height - h)
            left = min(int(u[3] * (width - w + 1)), width - w)
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class PretrainTransform:
    """RandomResizedCrop(size, scale, bicubic) + horizontal flip + normalisation, in torch ops.

    Fine-tuning adds ``rand_augment`` (on the [0, 1] crop, before normalisation) and ``random_erasing``
    (on the normalised tensor), each ``hook(img, generator) -> img`` (``augment.RandAugment``,
    ``augment.RandomErasing``), in the reference's order; None, the default, draws nothing more.
    """

    def __init__(
        self,
        size: int = 224,
        scale: Sequence[float] = (0.2, 1.0),
        ratio: Sequence[float] = (3 / 4, 4 / 3),
        hflip: float = 0.5,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        rand_augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
        random_erasing: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
    ):
        if size < 1:
            raise ValueError(f"crop size must be >= 1, got {size}")
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"crop scale must satisfy 0 < min <= max <= 1, got {tuple(scale)}")
        self.size, self.scale, self.ratio, self.hflip = size, tuple(scale), tuple(ratio), hflip
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)
        self.rand_augment, self.random_erasing = rand_augment, random_erasing

    def __call__(self, img: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        top, left, h, w = random_resized_crop_box(img.shape[1], img.shape[2], self.scale, self.ratio, generator)
        crop = img[:, top : top + h, left : left + w].unsqueeze(0)
        out = F.interpolate(crop, size=(self.size, self.size), mode="bicubic", align_corners=False, antialias=True)
        out = out.squeeze(0).clamp_(0.0, 1.0)
        if torch.rand(1, generator=generator).item() < self.hflip:
            out = out.flip(-1)
        if self.rand_augment is not None:
            out = self.rand_augment(out, generator)
        out = (out - self.mean) / self.std
        return out if self.random_erasing is None else self.random_erasing(out, generator)


class EvalTransform:
    """Resize the short side to ``size`` / 0.875, centre-crop ``size``, normalise (for the probe)."""

    def __init__(self, size: int = 224, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        self.size = size
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)

    def __call__(self, img: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        h, w = img.shape[1:]
        short = max(self.size, int(round(self.size / 0.875)))
        nh, nw = (short, max(short, round(w * short / h))) if h <= w else (max(short, round(h * short / w)), short)
        out = F.interpolate(img.unsqueeze(0), size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)
        top, left = (nh - self.size) // 2, (nw - self.size) // 2
        out = out[0, :, top : top + self.size, left : left + self.size].clamp_(0.0, 1.0)
        return (out - self.mean) / self.std


def model_fields(crop_size: int) -> dict:
    """Model config fields image data decides: the image side the transform crops to."""
    return {"image_size": crop_size}


class ImageFolderDataset(torch.utils.data.Dataset):
    """Images from a folder; item ``(index, seed)`` -> {"source": [3, S, S], "label": int}.

    An unreadable file raises :class:`CorruptSample`, which the loader counts and skips.
    """

    def __init__(self, root: str | os.PathLike, transform, listed: tuple[list[str], list[int], list[str]] | None = None):
        """``listed``: (paths, labels, classes) already read from ``root`` (e.g. a split with the training
        split's class order); None lists the folder (``list_images``)."""
        self.paths, self.labels, self.classes = listed if listed is not None else list_images(root)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, item: tuple[int, int]) -> dict:
        index, seed = item
        path = self.paths[index]
        try:
            img = load_rgb(path)
        except Exception as e:  # noqa: BLE001 - any decoder failure means a bad file
            raise CorruptSample(path, e) from e
        generator = torch.Generator().manual_seed(seed)
        return {"source": self.transform(img, generator), "label": self.labels[index]}

    def model_fields(self) -> dict:
        """Model config fields this data decides (``model_fields``)."""
        return model_fields(self.transform.size)


class TensorImageDataset(torch.utils.data.Dataset):
    """In-memory images [M, 3, H, W] in [0, 1] with labels (the embedded digits)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform, classes: list[str]):
        self.images, self.labels, self.transform, self.classes = images, labels, transform, classes

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, item: tuple[int, int]) -> dict:
        index, seed = item
        generator = torch.Generator().manual_seed(seed)
        return {"source": self.transform(self.images[index], generator), "label": int(self.labels[index])}

    def model_fields(self) -> dict:
        """Model config fields this data decides (``model_fields``)."""
        return model_fields(self.transform.size)
