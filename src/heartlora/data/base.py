"""Tasks: a dataset with VTAB-1K's four splits and class names, loaded as resized uint8 tensors.

Decoding and resizing happen once per (task, split, image size): the result is kept in memory on the task and on
disk (``cached_arrays``), so an epoch only gathers rows of a uint8 tensor and never touches PIL.
"""

from __future__ import annotations

import abc
import warnings
from typing import Any, Callable, Iterable

import numpy as np
import torch
from PIL import Image

from heartlora.data.cache import cached_arrays
from heartlora.errors import TaskError

GROUPS = ("natural", "specialized", "structured", "few-shot", "unknown")
# Part of every resized-cache key: bump it when resize_image changes, so old cache files are not reused.
# 2: 16-bit grayscale is scaled to 8 bits (version 1 clipped it to white); 3: float images in [0, 1] are scaled to
# 0..255 (version 2 clipped them to black)
RESIZE_VERSION = 3

NativeImage = np.ndarray | Image.Image


class ImageTooLargeError(TaskError):
    """An image file declares more pixels than PIL's decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``)."""


def open_image(path: Any, name: str | None = None,
               hint: str = "shrink the image, or raise PIL.Image.MAX_IMAGE_PIXELS if you trust the file",
               max_pixels: int | None = None) -> Image.Image:
    """Open and decode one image file or file object (use it in a ``with``). Its size is checked from the header
    before any pixel is decoded: more than ``PIL.Image.MAX_IMAGE_PIXELS`` pixels (or ``max_pixels``, if lower) is an
    `ImageTooLargeError`, since a small file can declare gigabytes of pixels; its message names the image as ``name``
    (default ``image PATH``) and ends with ``hint``. Missing or unreadable files raise what PIL raises (OSError and
    its subclasses)."""
    limit = Image.MAX_IMAGE_PIXELS
    if max_pixels is not None:
        limit = max_pixels if limit is None else min(limit, max_pixels)
    name = name or f"image {path}"
    # PIL only warns between 1x and 2x its limit and raises above; both are refused here, with one message.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(path)
        except Image.DecompressionBombError as error:
            raise ImageTooLargeError(f"{name} is too large to decode ({error}); {hint}") from None
    width, height = image.size
    if limit is not None and width * height > limit:
        image.close()
        raise ImageTooLargeError(f"{name} is {width}x{height} = {width * height:,} pixels, above the limit of "
                                 f"{limit:,} (a decompression bomb or a mistaken file); {hint}")
    try:
        image.load()
    except BaseException:
        image.close()
        raise
    return image


def to_pil(image: NativeImage) -> Image.Image:
    """A PIL image in mode "L" (grayscale) or "RGB", from a uint8 array (H, W), (H, W, 1|3|4) or any PIL image."""
    if isinstance(image, Image.Image):
        pil = image
    else:
        array = np.asarray(image)
        if array.dtype != np.uint8:
            raise TaskError(f"images must be uint8 arrays, got {array.dtype}; convert them with .astype(np.uint8)")
        if array.ndim == 3 and array.shape[-1] == 1:
            array = array[..., 0]
        if not (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (3, 4))):
            raise TaskError(f"an image has shape {array.shape}; use (H, W) grayscale or (H, W, 3) RGB uint8")
        pil = Image.fromarray(array)
    if pil.mode in ("L", "RGB"):
        return pil
    if pil.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        # 16-bit grayscale (PNG, TIFF; 32-bit "I" is read on the same 0..65535 scale): rounded to 8 bits. PIL's own
        # convert("L") clips every value above 255, which turns a 16-bit image white.
        wide = np.asarray(pil).astype(np.int64).clip(0, 65535)
        return Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8))
    if pil.mode == "F":
        # 32-bit float grayscale (TIFF): values in [0, 1] are scaled to 0..255, larger ones taken as 0..255 already
        # (PIL's convert("L") clips both, so a [0, 1] image turns black); NaN and infinity are refused
        values = np.asarray(pil, dtype=np.float64)
        if not np.isfinite(values).all():
            raise TaskError("a float image holds NaN or infinite values; store it as 8- or 16-bit")
        if values.size and values.min() >= 0 and values.max() <= 1:
            values = values * 255
        return Image.fromarray(np.rint(values.clip(0, 255)).astype(np.uint8))
    if pil.mode == "1":
        return pil.convert("L")
    if pil.mode == "LAB":  # PIL converts it to RGB by reinterpreting the channels, not by colour maths
        raise TaskError("an image is in the LAB colour space, which PIL does not convert to RGB faithfully; save it "
                        "as RGB")
    return pil.convert("RGB")  # palette, RGBA (alpha dropped), CMYK, YCbCr, LA…


def resize_image(image: NativeImage, size: int) -> np.ndarray:
    """Resize one image to (3, size, size) uint8 with PIL bicubic (antialiased when shrinking); grayscale is
    resized on one channel and then replicated. An image already at size×size is returned unchanged."""
    pil = to_pil(image)
    if pil.size != (size, size):
        pil = pil.resize((size, size), Image.Resampling.BICUBIC)
    array = np.asarray(pil)
    if array.ndim == 2:
        return np.repeat(array[None], 3, axis=0)
    return array.transpose(2, 0, 1)


def check_split(split: str) -> None:
    """Raise TaskError unless ``split`` is one of Task.SPLITS."""
    if split not in Task.SPLITS:
        raise TaskError(f"unknown split {split!r}; use one of {', '.join(Task.SPLITS)}")


class Task(abc.ABC):
    """A named classification dataset with the splits train800, val200, train800val200 and test.

    Subclasses provide ``labels`` and ``native_images`` (and ``cache_key`` to get an on-disk cache); ``load``
    turns them into resized tensors and caches them.
    """

    SPLITS = ("train800", "val200", "train800val200", "test")
    # True when `seed` changes what a split holds (few-shot sampling); otherwise the seed is ignored.
    SEEDED = False

    name: str
    class_names: list[str]
    group: str

    def __init__(self, name: str, class_names: list[str], group: str) -> None:
        if group not in GROUPS:
            raise TaskError(f"task {name!r} has group {group!r}; use one of {', '.join(GROUPS)}")
        self.name = name
        self.class_names = [str(c) for c in class_names]
        self.group = group
        self._memory: dict[tuple[str, int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, num_classes={self.num_classes}, group={self.group!r})"

    # What a subclass provides --------------------------------------------------------------------------------------

    @abc.abstractmethod
    def labels(self, split: str, seed: int = 0) -> np.ndarray:
        """The labels of ``split`` as int64 (N,), in the order of ``native_images``."""

    @abc.abstractmethod
    def native_images(self, split: str, seed: int = 0) -> Iterable[NativeImage]:
        """The images of ``split`` at their own size (uint8 (H, W) / (H, W, 3) arrays or PIL images), one at a time
        so that a large split of large files is never held decoded in memory."""

    def cache_key(self, split: str, seed: int = 0) -> str | None:
        """A string that changes whenever the content of ``split`` changes, or None for no on-disk cache."""
        return None

    def split_parts(self, split: str) -> tuple[str, ...]:
        """The splits whose concatenation is ``split`` (itself unless e.g. train800val200 = train800 + val200);
        a composed split is loaded from its parts' caches instead of being cached again."""
        return (split,)

    def check(self, split: str, seed: int = 0) -> None:
        """Raise TaskError now for what would make loading ``split`` fail later, where that is cheap to see (a
        listed file that is missing), without decoding it: a run checks its test split before it trains."""

    def notes(self) -> list[str]:
        """What in the task is allowed but likely a mistake (``heartlora train`` prints each as a ``note:`` line)."""
        return []

    # What every task gets -------------------------------------------------------------------------------------------

    def split_sizes(self) -> dict[str, int]:
        """Number of images in each split."""
        return {split: len(self.labels(split)) for split in self.SPLITS}

    def load(self, split: str, img_size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Images as a uint8 CPU tensor (N, 3, img_size, img_size) and labels as int64 (N,).

        The tensors are cached on the task: treat them as read-only (index them, which copies, before changing).
        """
        check_split(split)
        if isinstance(img_size, bool) or not isinstance(img_size, int) or img_size < 1:
            raise TaskError(f"img_size must be a positive int, got {img_size!r}")
        seed = int(seed) if self.SEEDED else 0
        memory_key = (split, img_size, seed)
        if memory_key not in self._memory:
            parts = self.split_parts(split)
            if parts != (split,):
                loaded = [self.load(part, img_size, seed) for part in parts]
                result = (torch.cat([x for x, _ in loaded]), torch.cat([y for _, y in loaded]))
            else:
                images, labels = self._resized(split, img_size, seed)
                result = (torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64, copy=False)))
            self._memory[memory_key] = result
        return self._memory[memory_key]

    def _resized(self, split: str, img_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        def build() -> dict[str, np.ndarray]:
            labels = np.asarray(self.labels(split, seed), dtype=np.int64)
            return {"images": self._resize_all(split, img_size, seed, len(labels)), "labels": labels}

        key = self.cache_key(split, seed)
        if key is None:
            arrays = build()
        else:
            arrays = cached_arrays(f"{key}|{split}|{img_size}px|resize-v{RESIZE_VERSION}", build)
        return arrays["images"], arrays["labels"]

    def _resize_all(self, split: str, img_size: int, seed: int, count: int) -> np.ndarray:
        out = np.empty((count, 3, img_size, img_size), dtype=np.uint8)
        seen = 0
        for image in self.native_images(split, seed):
            if seen == count:
                break
            out[seen] = resize_image(image, img_size)
            seen += 1
        if seen != count:
            raise TaskError(f"task {self.name!r} split {split!r} has {count} labels but {seen} images; fix its source")
        return out


class ArrayTask(Task):
    """A task whose splits are numpy arrays made by ``build()``.

    ``build()`` returns ``{"train800": (images, labels), "val200": ..., "test": ...}`` (optionally
    "train800val200"; when absent it is train800 + val200), images uint8 (N, H, W) or (N, H, W, 3) at their native
    resolution. It is called lazily, at most once per process; with a ``cache_key`` its result is also stored on
    disk (so a slow generator runs once per machine) and the resized tensors are cached on disk too. Change the
    cache_key whenever what ``build`` returns changes.
    """

    def __init__(self, name: str, class_names: list[str], group: str,
                 build: Callable[[], dict[str, tuple[np.ndarray, np.ndarray]]], cache_key: str | None = None) -> None:
        super().__init__(name, class_names, group)
        self._build = build
        self._cache_key = cache_key
        self._arrays: dict[str, tuple[np.ndarray, np.ndarray]] | None = None

    def arrays(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """The native arrays of every split (building them on first use)."""
        if self._arrays is None:
            if self._cache_key is None:
                raw = self._build()
            else:
                flat = cached_arrays(f"{self._cache_key}|native", lambda: _flatten(self._build()))
                raw = {split: (flat[f"{split}/images"], flat[f"{split}/labels"])
                       for split in self.SPLITS if f"{split}/images" in flat}
            self._arrays = self._checked(raw)
        return self._arrays

    def _checked(self, raw: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        missing = [s for s in ("train800", "val200", "test") if s not in raw]
        if missing:
            raise TaskError(f"task {self.name!r}: build() returned no {', '.join(missing)}; return all of "
                            "train800, val200 and test")
        checked = {}
        for split, (images, labels) in raw.items():
            check_split(split)
            images, labels = np.asarray(images), np.asarray(labels)
            if images.dtype != np.uint8 or not (images.ndim == 3 or (images.ndim == 4 and images.shape[-1] == 3)):
                raise TaskError(f"task {self.name!r} split {split!r}: images are {images.dtype} {images.shape}; "
                                "build() must return uint8 (N, H, W) or (N, H, W, 3)")
            if labels.shape != (len(images),):
                raise TaskError(f"task {self.name!r} split {split!r}: {len(images)} images but labels of shape "
                                f"{labels.shape}; return one label per image")
            if len(labels) and (labels.min() < 0 or labels.max() >= self.num_classes):
                raise TaskError(f"task {self.name!r} split {split!r}: labels outside 0..{self.num_classes - 1}; "
                                "fix the labels or the class names")
            checked[split] = (images, labels.astype(np.int64))
        return checked

    def labels(self, split: str, seed: int = 0) -> np.ndarray:
        check_split(split)
        return np.concatenate([self.arrays()[part][1] for part in self.split_parts(split)])

    def native_images(self, split: str, seed: int = 0) -> Iterable[np.ndarray]:
        check_split(split)
        for part in self.split_parts(split):
            yield from self.arrays()[part][0]

    def cache_key(self, split: str, seed: int = 0) -> str | None:
        return self._cache_key

    def split_parts(self, split: str) -> tuple[str, ...]:
        if split == "train800val200" and "train800val200" not in self.arrays():
            return ("train800", "val200")
        return (split,)


def _flatten(arrays: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, np.ndarray]:
    """``{split: (images, labels)}`` as the flat name → array mapping an npz holds."""
    flat = {}
    for split, (images, labels) in arrays.items():
        flat[f"{split}/images"] = np.asarray(images)
        flat[f"{split}/labels"] = np.asarray(labels)
    return flat
