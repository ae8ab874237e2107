"""VTAB's structured group, generated: dSprites-, CLEVR- and smallNORB-like images with VTAB's label definitions.

Every task has a fixed data seed: train800 and val200 are the first 800 and next 200 images drawn with the task's
seed, test is ``test_size`` images (2,000 by default) drawn with seed + 1 (smallNORB: from the held-out toy
instances, as in smallNORB's own train/test split). All splits are cached on disk; the cache key carries the
generator's ``VERSION``, so a change to a generator invalidates its old images.

Native images: dSprites 64×64 binary, CLEVR 128×128 RGB, smallNORB 96×96 grayscale. Rendering costs about
0.2 ms (dSprites), 15 ms (CLEVR) and 11 ms (smallNORB) of one CPU core per image, so the first use of a 3D task
(1,000 + 2,000 images) takes 35-50 s of CPU; later uses read the cache.

Label distributions, as in VTAB (random images from the full dataset, no rebalancing):

- ``dsprites_loc``: x position (32 values) → 16 bins of 2 values: balanced.
- ``dsprites_ori``: orientation (40 values) → 16 bins of ``floor(i / 2.5)``: bins alternately hold 3 and 2
  orientation values, so even classes are 1.5× as frequent as odd ones (VTAB's natural distribution).
- ``clevr_count``: 3..10 objects, uniform: balanced.
- ``clevr_dist``: closest object's depth in bins [0, 8, 8.5, 9, 9.5, 10, 100]: natural, about 21 / 21 / 22 / 16 /
  10 / 10 %.
- ``smallnorb_azi`` (18 classes) and ``smallnorb_ele`` (9 classes): uniform factors, balanced in expectation.

>>> from heartlora.data.generated import render_dsprites, render_clevr, render_smallnorb
>>> images, latents = render_dsprites(16, seed=0)     # uint8 (16, 64, 64), latent indices (16, 5)
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from heartlora.data.base import ArrayTask
from heartlora.data.generated import clevr, dsprites, smallnorb
from heartlora.data.generated.clevr import render_clevr
from heartlora.data.generated.dsprites import render_dsprites
from heartlora.data.generated.smallnorb import render_smallnorb
from heartlora.data.registry import register_task

DEFAULT_TEST_SIZE = 2000
GROUP = "structured"
Splits = dict[str, tuple[np.ndarray, np.ndarray]]

__all__ = ["DEFAULT_TEST_SIZE", "preview", "render_clevr", "render_dsprites", "render_smallnorb"]

# A task draws n images and their labels from a seed; `test` selects smallNORB's held-out toys.
Draw = Callable[[int, int, bool], tuple[np.ndarray, np.ndarray]]


def _dsprites(label: Callable[[np.ndarray], np.ndarray]) -> Draw:
    def draw(n: int, seed: int, test: bool) -> tuple[np.ndarray, np.ndarray]:
        images, latents = render_dsprites(n, seed)
        return images, label(latents)

    return draw


def _clevr(label: Callable[[dict[str, np.ndarray]], np.ndarray]) -> Draw:
    def draw(n: int, seed: int, test: bool) -> tuple[np.ndarray, np.ndarray]:
        images, info = render_clevr(n, seed)
        return images, label(info)

    return draw


def _smallnorb(factor: str) -> Draw:
    def draw(n: int, seed: int, test: bool) -> tuple[np.ndarray, np.ndarray]:
        images, factors = render_smallnorb(n, seed, smallnorb.TEST_INSTANCES if test else smallnorb.TRAIN_INSTANCES)
        return images, factors[factor]

    return draw


# name → (data seed, generator version, draw). Test images use seed + 1.
_SPECS: dict[str, tuple[int, int, Draw]] = {
    "dsprites_loc": (1010, dsprites.VERSION, _dsprites(dsprites.label_location)),
    "dsprites_ori": (1020, dsprites.VERSION, _dsprites(dsprites.label_orientation)),
    "clevr_count": (2010, clevr.VERSION, _clevr(clevr.label_count)),
    "clevr_dist": (2020, clevr.VERSION, _clevr(clevr.label_distance)),
    "smallnorb_azi": (3010, smallnorb.VERSION, _smallnorb("azimuth")),
    "smallnorb_ele": (3020, smallnorb.VERSION, _smallnorb("elevation")),
}


def preview(name: str, n: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """The first ``n`` training images of generated task ``name`` and their labels, without building the task
    (a quick look: these are exactly the first images of its train800 split)."""
    seed, _, draw = _SPECS[name]
    return draw(n, seed, False)


def _task(name: str, class_names: list[str], test_size: int) -> ArrayTask:
    seed, version, draw = _SPECS[name]

    def build() -> Splits:
        train, train_labels = draw(1000, seed, False)
        test, test_labels = draw(test_size, seed + 1, True)
        return {"train800": (train[:800], train_labels[:800]), "val200": (train[800:], train_labels[800:]),
                "test": (test, test_labels)}

    key = f"generated-{name}-v{version}-seed{seed}-test{test_size}"
    return ArrayTask(name, class_names, GROUP, build, cache_key=key)


@register_task("dsprites_loc", "dSprites-like sprites, 64x64 binary, x position in 16 bins (generated)", GROUP)
def dsprites_loc(test_size: int = DEFAULT_TEST_SIZE) -> ArrayTask:
    """VTAB ``dSprites/location``: which of 16 horizontal bands the sprite's centre is in."""
    return _task("dsprites_loc", [f"x bin {i}" for i in range(16)], test_size)


@register_task("dsprites_ori", "dSprites-like sprites, 64x64 binary, orientation in 16 bins (generated)", GROUP)
def dsprites_ori(test_size: int = DEFAULT_TEST_SIZE) -> ArrayTask:
    """VTAB ``dSprites/orientation``: the sprite's rotation in 16 bins of 2.5 of the 40 orientations."""
    return _task("dsprites_ori", [f"orientation bin {i}" for i in range(16)], test_size)


@register_task("clevr_count", "CLEVR-like scenes, 128x128 RGB, number of objects 3..10 (generated)", GROUP)
def clevr_count(test_size: int = DEFAULT_TEST_SIZE) -> ArrayTask:
    """VTAB ``CLEVR/count``: how many objects the scene holds (class = count − 3)."""
    names = [f"{k} objects" for k in range(clevr.MIN_OBJECTS, clevr.MAX_OBJECTS + 1)]
    return _task("clevr_count", names, test_size)


@register_task("clevr_dist", "CLEVR-like scenes, 128x128 RGB, depth of the closest object in 6 bins (generated)",
               GROUP)
def clevr_dist(test_size: int = DEFAULT_TEST_SIZE) -> ArrayTask:
    """VTAB ``CLEVR/distance``: the closest object's camera depth binned at 8, 8.5, 9, 9.5 and 10."""
    t = clevr.DIST_THRESHOLDS
    names = [f"depth {lo:g}-{hi:g}" for lo, hi in zip(t[:-1], t[1:])]
    return _task("clevr_dist", names, test_size)


@register_task("smallnorb_azi", "smallNORB-like toys, 96x96 grayscale, camera azimuth in 18 steps (generated)", GROUP)
def smallnorb_azi(test_size: int = DEFAULT_TEST_SIZE) -> ArrayTask:
    """VTAB ``smallNORB/azimuth``: which of the 18 azimuths (0°..340°, step 20°) the toy is seen from."""
    names = [f"azimuth {a}" for a in smallnorb.AZIMUTHS]
    return _task("smallnorb_azi", names, test_size)


@register_task("smallnorb_ele", "smallNORB-like toys, 96x96 grayscale, camera elevation in 9 steps (generated)",
               GROUP)
def smallnorb_ele(test_size: int = DEFAULT_TEST_SIZE) -> ArrayTask:
    """VTAB ``smallNORB/elevation``: which of the 9 elevations (30°..70°, step 5°) the toy is seen from."""
    names = [f"elevation {e}" for e in smallnorb.ELEVATIONS]
    return _task("smallnorb_ele", names, test_size)
