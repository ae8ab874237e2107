"""CLEVR-like scenes: 3 to 10 objects on a grey floor, seen by a jittered camera, rendered by :mod:`.render3d`.

Scene statistics follow CLEVR's generator: objects (cube, sphere, cylinder; large 0.7 or small 0.35; 8 colours;
rubber or metal; any rotation) placed uniformly on the square [−3, 3]², at least 0.25 apart, every object visible;
camera at CLEVR's position (7.36, −6.93, 4.96) ± 0.5 per axis looking at the origin. The number of objects is
uniform over 3..10, so ``clevr_count`` is balanced; ``clevr_dist`` keeps the natural distribution of the closest
object's depth, as VTAB does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .render3d import CUBE, CYLINDER, SPHERE, Camera, Light, Lighting, Primitive, render, rotation_z, to_uint8

VERSION = 2  # in the cache key: bump whenever the images or labels change; also when render3d changes
SIZE = 128
SHAPES = {"cube": CUBE, "sphere": SPHERE, "cylinder": CYLINDER}
SIZES = {"large": 0.7, "small": 0.35}
# CLEVR's eight colours (sRGB 0..255), converted to linear light for shading.
COLOURS = {
    "gray": (87, 87, 87), "red": (173, 35, 35), "blue": (42, 75, 215), "green": (29, 105, 20),
    "brown": (129, 74, 25), "purple": (129, 38, 192), "cyan": (41, 208, 208), "yellow": (255, 238, 51),
}
MATERIALS = ("rubber", "metal")
MIN_OBJECTS, MAX_OBJECTS = 3, 10
DIST_THRESHOLDS = (0.0, 8.0, 8.5, 9.0, 9.5, 10.0, 100.0)  # VTAB's bins of the closest object's depth

_CAMERA = np.array([7.358891, -6.925791, 4.958309])
_JITTER = 0.5
_FOV = 36.0  # vertical, for the square crop; CLEVR's 480×320 frame is about 49°×34°
_MARGIN = 0.06  # object centres stay this far (in image fractions) inside the frame
_MIN_GAP = 0.25  # CLEVR's minimum distance between object surfaces
_MIN_PIXELS = 24  # every object must show at least this many pixels, so the count is answerable from the image
_FLOOR = np.full(3, 0.26)
_LIGHTING = Lighting(
    lights=[Light((0.5, -6.0, 3.6), 1.0, shadows=True),  # key light, front-left of the camera: shadows fall right
            Light((-4.7, -4.0, 3.0), 0.2),  # fill light
            Light((-1.2, 2.6, 5.8), 0.25)],  # back light
    ambient=0.22, sky=0.85, specular=0.35, shininess=25.0, shadow_blur=2,
)


@dataclass
class ClevrObject:
    """One object of a scene: shape, size, colour and material names, floor position and rotation (radians)."""

    shape: str
    size: str
    colour: str
    material: str
    x: float
    y: float
    rotation: float

    def centre(self) -> np.ndarray:
        """World position of the object's centre; cubes are scaled by 1/√2 so they look as big as the others."""
        return np.array([self.x, self.y, self.radius()])

    def radius(self) -> float:
        """Half-height of the object (CLEVR's per-shape scale)."""
        r = SIZES[self.size]
        return r / np.sqrt(2) if self.shape == "cube" else r

    def primitive(self) -> Primitive:
        """The object as a ray-castable primitive."""
        colour = (np.asarray(COLOURS[self.colour]) / 255.0) ** 2.2
        return Primitive(SHAPES[self.shape], self.centre(), rotation_z(self.rotation) * self.radius(), colour,
                         metal=self.material == "metal")


@dataclass
class ClevrScene:
    """Objects and the camera of one image."""

    objects: list[ClevrObject]
    camera: Camera

    def depths(self) -> np.ndarray:
        """Camera-space depth of every object's centre."""
        return np.array([self.camera.depth(o.centre()) for o in self.objects])

    def closest_depth(self) -> float:
        """Depth of the closest object, the quantity ``clevr_dist`` bins."""
        return float(self.depths().min())


def _place(rng: np.random.Generator, camera: Camera, n: int) -> list[ClevrObject] | None:
    """Place ``n`` random objects with CLEVR's spacing rule and inside the frame; None if it gets stuck."""
    objects: list[ClevrObject] = []
    for _ in range(n):
        for _attempt in range(100):
            obj = ClevrObject(
                shape=list(SHAPES)[rng.integers(len(SHAPES))], size=list(SIZES)[rng.integers(len(SIZES))],
                colour=list(COLOURS)[rng.integers(len(COLOURS))], material=MATERIALS[rng.integers(2)],
                x=float(rng.uniform(-3, 3)), y=float(rng.uniform(-3, 3)), rotation=float(rng.uniform(0, 2 * np.pi)),
            )
            # Each object's footprint lies within its size r of its centre (a cube's half-size r/√2 reaches r at
            # the corners), so CLEVR's gap rule is on centre distance minus both sizes.
            if any(np.hypot(obj.x - o.x, obj.y - o.y) - SIZES[obj.size] - SIZES[o.size] < _MIN_GAP for o in objects):
                continue
            u, v = camera.project(obj.centre())
            if not (_MARGIN < u < 1 - _MARGIN and _MARGIN < v < 1 - _MARGIN):
                continue
            objects.append(obj)
            break
        else:
            return None
    return objects


def sample_scene(rng: np.random.Generator, num_objects: int | None = None) -> ClevrScene:
    """A random scene (layout only; nothing is rendered)."""
    n = int(rng.integers(MIN_OBJECTS, MAX_OBJECTS + 1)) if num_objects is None else num_objects
    while True:
        camera = Camera(_CAMERA + rng.uniform(-_JITTER, _JITTER, size=3), np.zeros(3), _FOV)
        objects = _place(rng, camera, n)
        if objects is not None:
            return ClevrScene(objects, camera)


def render_scene(scene: ClevrScene, size: int = SIZE, min_visible: int = 0) -> tuple[np.ndarray, np.ndarray] | None:
    """RGB uint8 image (size, size, 3) and object-id image (size, size; −1 for the floor) of a scene, or None when
    some object shows fewer than ``min_visible`` pixels."""
    out = render([o.primitive() for o in scene.objects], scene.camera, _LIGHTING, size, _FLOOR,
                 min_visible=min_visible)
    return None if out is None else (to_uint8(out[0]), out[1])


def draw_scene(rng: np.random.Generator, size: int = SIZE) -> tuple[ClevrScene, np.ndarray, np.ndarray]:
    """A random scene in which every object is visible, with its image and object-id image.

    A layout where some object is hidden behind others (fewer than a handful of visible pixels) is redrawn, as
    CLEVR's generator does, so the count is answerable from the image.
    """
    min_visible = max(1, round(_MIN_PIXELS * (size / SIZE) ** 2))
    # The count is drawn once: redrawing it with the layout would favour small counts, whose scenes hide fewer
    # objects, and clevr_count would no longer be balanced.
    num_objects = int(rng.integers(MIN_OBJECTS, MAX_OBJECTS + 1))
    while True:
        scene = sample_scene(rng, num_objects)
        out = render_scene(scene, size, min_visible)
        if out is not None:
            return scene, out[0], out[1]


def render_clevr(n: int, seed: int, size: int = SIZE) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """``n`` random scenes: uint8 images (n, size, size, 3) and per-image ``num_objects`` and ``closest_depth``.

    Image ``i`` is ``draw_scene(np.random.default_rng([seed, i]), size)``: it depends only on ``(seed, i)``.
    """
    imgs = np.empty((n, size, size, 3), dtype=np.uint8)
    counts = np.empty(n, dtype=np.int64)
    depths = np.empty(n, dtype=np.float64)
    for i in range(n):
        scene, imgs[i], _ = draw_scene(np.random.default_rng([seed, i]), size)
        counts[i], depths[i] = len(scene.objects), scene.closest_depth()
    return imgs, {"num_objects": counts, "closest_depth": depths}


def label_count(info: dict[str, np.ndarray]) -> np.ndarray:
    """VTAB ``clevr_count``: number of objects − 3 (8 classes)."""
    return info["num_objects"] - MIN_OBJECTS


def label_distance(info: dict[str, np.ndarray]) -> np.ndarray:
    """VTAB ``clevr_dist``: the closest depth's bin in :data:`DIST_THRESHOLDS` (6 classes)."""
    return (np.digitize(info["closest_depth"], DIST_THRESHOLDS[1:-1])).astype(np.int64)
