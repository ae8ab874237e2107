"""smallNORB-like images: a grey toy on a plain turntable, 96×96 grayscale, rendered by :mod:`.render3d`.

Five categories built from primitives (four-legged animal, human figure, airplane, truck, car), ten instances each
with their own proportions, shade and pose details. As in smallNORB, instances 4, 6, 7, 8, 9 are for training and
0, 1, 2, 3, 5 for testing; each image has one of 6 lighting conditions, 9 camera elevations (30°..70°, step 5°) and
18 azimuths (0°..340°, step 20°). The object turns on the turntable while the camera and lights stay put, so
shadows do not give the azimuth away. Factors are sampled uniformly, so both label sets are balanced in
expectation, like smallNORB's full factorial design.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .render3d import (
    CUBE,
    CYLINDER,
    SPHERE,
    Camera,
    Light,
    Lighting,
    Primitive,
    render,
    rotation_x,
    rotation_y,
    rotation_z,
    to_uint8,
)

VERSION = 1  # in the cache key: bump whenever the images or labels change; also when render3d changes
SIZE = 96
CATEGORIES = ("animal", "human", "airplane", "truck", "car")
TRAIN_INSTANCES = (4, 6, 7, 8, 9)
TEST_INSTANCES = (0, 1, 2, 3, 5)
AZIMUTHS = np.arange(0, 360, 20)  # degrees, 18 values
ELEVATIONS = np.arange(30, 75, 5)  # degrees, 9 values
NUM_LIGHTINGS = 6
_INSTANCE_SEED = 20_071_101  # fixes the toys themselves; the task seed only picks which views are shown
_DISTANCE, _FOV = 5.8, 30.0
_TOY_RADIUS = 1.0  # bounding radius every toy is scaled to; the frame's half-width at the toy is 1.55
_BACKGROUND = np.full(3, 0.62)
# Six lighting conditions: (azimuth of the key light relative to the camera, its elevation, its intensity, ambient).
_LIGHTINGS = ((-40, 55, 0.8, 0.30), (40, 55, 0.8, 0.30), (0, 80, 0.75, 0.35),
              (-70, 35, 0.7, 0.35), (70, 35, 0.7, 0.35), (0, 45, 0.55, 0.45))

Part = tuple[int, np.ndarray, np.ndarray]  # (primitive kind, centre, matrix) in the toy's own frame


def _box(centre, half, yaw: float = 0.0, pitch: float = 0.0) -> Part:
    return CUBE, np.asarray(centre, float), rotation_z(yaw) @ rotation_y(pitch) @ np.diag(half)


def _ellipsoid(centre, radii, pitch: float = 0.0, roll: float = 0.0) -> Part:
    return SPHERE, np.asarray(centre, float), rotation_y(pitch) @ rotation_x(roll) @ np.diag(radii)


def _cylinder(centre, radius: float, half_length: float, axis: str = "z", tilt: float = 0.0) -> Part:
    """A cylinder along world ``axis`` (x, y or z), tilted by ``tilt`` radians about y (z-axis cylinders only)."""
    turn = {"z": np.eye(3), "x": rotation_y(np.pi / 2), "y": rotation_x(np.pi / 2)}[axis]
    return CYLINDER, np.asarray(centre, float), rotation_y(tilt) @ turn @ np.diag([radius, radius, half_length])


def _animal(r: np.random.Generator) -> list[Part]:
    length, height, girth = r.uniform(0.75, 1.05), r.uniform(0.35, 0.55), r.uniform(0.17, 0.26)
    leg, neck = r.uniform(0.045, 0.075), r.uniform(0.25, 0.5)
    body_z = 2 * height * 0.5 + girth * 0.6
    parts = [_ellipsoid((0, 0, body_z), (length / 2, girth, girth * 0.95))]
    for sx in (-1, 1):
        for sy in (-1, 1):
            parts.append(_cylinder((sx * length * 0.32, sy * girth * 0.55, body_z / 2), leg, body_z / 2))
    head_x, head_z = length / 2 + 0.08, body_z + neck
    parts.append(_ellipsoid((length / 2 - 0.02, 0, body_z + neck / 2), (0.09, 0.08, neck / 2 + 0.05), pitch=0.5))
    parts.append(_ellipsoid((head_x + 0.06, 0, head_z), (0.17, 0.09, 0.09), pitch=r.uniform(-0.2, 0.4)))
    parts.append(_ellipsoid((-length / 2 - 0.1, 0, body_z + 0.05), (0.18, 0.035, 0.035), pitch=-0.6))  # tail
    for sy in (-1, 1):  # ears
        parts.append(_ellipsoid((head_x - 0.02, sy * 0.06, head_z + 0.1), (0.03, 0.025, 0.07)))
    return parts


def _human(r: np.random.Generator) -> list[Part]:
    leg_len, torso, shoulders = r.uniform(0.55, 0.7), r.uniform(0.45, 0.6), r.uniform(0.17, 0.24)
    reach = r.uniform(0.4, 1.3)  # how far the arms swing forward: the figure must have a front
    hip = leg_len
    parts = []
    for sy in (-1, 1):
        parts.append(_cylinder((0, sy * shoulders * 0.5, hip / 2), 0.065, hip / 2))
        parts.append(_box((0.07, sy * shoulders * 0.5, 0.03), (0.12, 0.055, 0.03)))  # feet point forward
    parts.append(_box((0, 0, hip + torso / 2), (0.11, shoulders, torso / 2)))
    parts.append(_ellipsoid((0, 0, hip + torso + 0.15), (0.12, 0.11, 0.14)))
    parts.append(_ellipsoid((0.12, 0, hip + torso + 0.14), (0.04, 0.03, 0.04)))  # nose
    arm = torso * 0.5
    for sy, swing in ((-1, reach), (1, reach * r.uniform(0.2, 1.0))):
        # Arms hang from the shoulders and swing forward (rotation about y): the centre moves with the swing.
        cx, cz = np.sin(swing) * arm, hip + torso - np.cos(swing) * arm
        parts.append(_cylinder((cx, sy * (shoulders + 0.06), cz), 0.05, arm, tilt=-swing))
    return parts


def _airplane(r: np.random.Generator) -> list[Part]:
    length, span, radius = r.uniform(1.6, 2.0), r.uniform(1.3, 1.9), r.uniform(0.11, 0.16)
    sweep, z = r.uniform(0.0, 0.5), radius + 0.25
    parts = [_ellipsoid((0, 0, z), (length / 2, radius, radius))]
    for sy in (-1, 1):  # swept wings: each half is a box yawed backwards
        parts.append(_box((0.05 - np.sin(sweep) * span / 4, sy * span / 4, z - radius * 0.3),
                          (0.2, span / 4, 0.025), yaw=-sy * sweep))
    parts.append(_box((-length / 2 + 0.12, 0, z + 0.2), (0.13, 0.02, 0.18), pitch=-0.3))  # fin
    parts.append(_box((-length / 2 + 0.1, 0, z + 0.02), (0.09, span * 0.18, 0.02)))  # stabiliser
    parts.append(_cylinder((0.25, 0, (z - radius) / 2), 0.03, (z - radius) / 2 + 0.02))  # landing gear
    parts.append(_cylinder((-0.2, 0, (z - radius) / 2), 0.03, (z - radius) / 2 + 0.02))
    return parts


def _wheels(xs: tuple[float, ...], half_width: float, radius: float) -> list[Part]:
    return [_cylinder((x, sy * half_width, radius), radius, 0.07, axis="y") for x in xs for sy in (-1, 1)]


def _truck(r: np.random.Generator) -> list[Part]:
    length, width, wheel = r.uniform(1.6, 2.0), r.uniform(0.6, 0.8), r.uniform(0.15, 0.2)
    cab_len, cab_h, cargo_h = r.uniform(0.35, 0.5), r.uniform(0.45, 0.6), r.uniform(0.45, 0.75)
    floor = wheel + 0.05
    front = length / 2
    parts = [_box((front - cab_len / 2, 0, floor + cab_h / 2), (cab_len / 2, width / 2, cab_h / 2)),
             _box((front - cab_len - 0.05 - (length - cab_len - 0.05) / 2, 0, floor + cargo_h / 2),
                  ((length - cab_len - 0.05) / 2, width / 2 + 0.02, cargo_h / 2)),
             _box((0, 0, floor - 0.03), (length / 2, width / 2 - 0.05, 0.04))]  # chassis
    return parts + _wheels((front - cab_len / 2, -length * 0.15, -length * 0.38), width / 2, wheel)


def _car(r: np.random.Generator) -> list[Part]:
    length, width, wheel = r.uniform(1.5, 1.9), r.uniform(0.65, 0.8), r.uniform(0.14, 0.18)
    body_h, cabin_h, cabin_len = r.uniform(0.22, 0.3), r.uniform(0.18, 0.26), r.uniform(0.35, 0.5) * length
    cabin_x = -r.uniform(0.05, 0.18) * length  # cabin set back: the hood is longer than the boot
    base = wheel * 0.9
    return [_box((0, 0, base + body_h / 2), (length / 2, width / 2, body_h / 2)),
            _box((cabin_x, 0, base + body_h + cabin_h / 2), (cabin_len / 2, width / 2 - 0.05, cabin_h / 2)),
            _box((cabin_x + cabin_len / 2, 0, base + body_h + cabin_h * 0.3), (0.08, width / 2 - 0.06, cabin_h * 0.3),
                 pitch=0.6)] + _wheels((length * 0.32, -length * 0.32), width / 2 - 0.02, wheel)


_BUILDERS = {"animal": _animal, "human": _human, "airplane": _airplane, "truck": _truck, "car": _car}


@dataclass
class Toy:
    """One toy instance: its parts in the object frame (x forward, z up, standing on z = 0) and its grey level."""

    category: str
    instance: int
    parts: list[Part]
    grey: float

    def primitives(self, azimuth_deg: float) -> list[Primitive]:
        """The toy turned by ``azimuth_deg`` on the turntable (counter-clockwise seen from above)."""
        turn = rotation_z(np.radians(azimuth_deg))
        centre = self.centre()
        # Turn about the vertical axis through the toy's centre, which ends up above the world origin.
        centre[2] = 0.0
        return [Primitive(kind, turn @ (c - centre), turn @ m, self.grey) for kind, c, m in self.parts]

    def centre(self) -> np.ndarray:
        """Centre of the toy's bounding box (each part's box is ``c ± |M|·1``): what the camera looks at."""
        lo = np.min([c - np.abs(m).sum(axis=1) for _, c, m in self.parts], axis=0)
        hi = np.max([c + np.abs(m).sum(axis=1) for _, c, m in self.parts], axis=0)
        return (lo + hi) / 2


def make_toy(category: str, instance: int) -> Toy:
    """The fixed toy ``instance`` (0..9) of ``category``: the same on every machine, whatever the task seed."""
    cat = CATEGORIES.index(category)
    r = np.random.default_rng([_INSTANCE_SEED, cat, instance])
    parts = _BUILDERS[category](r)
    # Scale every toy to the same bounding radius, so all fill the frame alike (smallNORB's framing).
    centre = Toy(category, instance, parts, 0.0).centre()
    radius = max(np.linalg.norm(c - centre) + np.linalg.norm(m, 2) for _, c, m in parts)
    scale = _TOY_RADIUS / radius
    return Toy(category, instance, [(k, c * scale, m * scale) for k, c, m in parts], grey=float(r.uniform(0.18, 0.35)))


def _camera(elevation_deg: float, target: np.ndarray) -> Camera:
    e = np.radians(elevation_deg)
    eye = target + _DISTANCE * np.array([np.cos(e), 0.0, np.sin(e)])  # the camera sits on the +x side
    return Camera(eye, target, _FOV)


def _lighting(condition: int) -> Lighting:
    azi, ele, power, ambient = _LIGHTINGS[condition]
    a, e = np.radians(azi), np.radians(ele)
    key = Light((np.cos(e) * np.cos(a), np.cos(e) * np.sin(a), np.sin(e)), power, shadows=True)
    fill = Light((0.3, -np.sign(azi or 1) * 0.5, 0.8), 0.15)
    return Lighting([key, fill], ambient=ambient, sky=0.6, specular=0.08, shininess=12.0, shadow_blur=2)


def render_view(toy: Toy, azimuth_deg: float, elevation_deg: float, lighting: int, size: int = SIZE) -> np.ndarray:
    """One grayscale uint8 image (size, size) of ``toy`` seen from the given azimuth and elevation."""
    centre = toy.centre()
    target = np.array([0.0, 0.0, centre[2]])
    out = render(toy.primitives(azimuth_deg), _camera(elevation_deg, target), _lighting(lighting), size, _BACKGROUND)
    assert out is not None
    return to_uint8(out[0][..., 0])


def render_smallnorb(n: int, seed: int, instances: tuple[int, ...] = TRAIN_INSTANCES,
                     size: int = SIZE) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """``n`` random views: uint8 images (n, size, size) and per-image factor indices ``category``, ``instance``,
    ``lighting``, ``elevation`` (0..8) and ``azimuth`` (0..17). Image ``i`` depends only on ``(seed, i)``."""
    toys = {(c, k): make_toy(c, k) for c in CATEGORIES for k in instances}
    imgs = np.empty((n, size, size), dtype=np.uint8)
    factors = {k: np.empty(n, dtype=np.int64) for k in ("category", "instance", "lighting", "elevation", "azimuth")}
    for i in range(n):
        r = np.random.default_rng([seed, i])
        cat, inst = int(r.integers(len(CATEGORIES))), int(instances[r.integers(len(instances))])
        light = int(r.integers(NUM_LIGHTINGS))
        ele, azi = int(r.integers(len(ELEVATIONS))), int(r.integers(len(AZIMUTHS)))
        img = render_view(toys[CATEGORIES[cat], inst], AZIMUTHS[azi], ELEVATIONS[ele], light, size)
        # Sensor noise, as the real camera images have; seeded with the image, so still deterministic.
        imgs[i] = np.clip(img + r.normal(0.0, 2.0, img.shape), 0, 255).astype(np.uint8)
        for key, value in zip(factors, (cat, inst, light, ele, azi)):
            factors[key][i] = value
    return imgs, factors
