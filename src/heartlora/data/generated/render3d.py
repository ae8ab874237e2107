"""A small numpy ray caster for the CLEVR-like and smallNORB-like tasks.

A scene is a list of :class:`Primitive` (a unit sphere, cube or cylinder under an affine map) above a ground plane
``z = 0``. One primary ray per pixel finds the nearest surface (silhouette pixels are re-traced with four sub-pixel
rays, for smooth edges); lights marked ``shadows`` cast them (one shadow ray per pixel, softened on the floor by a
small blur in image space); shading is Lambert plus a Blinn-Phong highlight, and metals add a reflection of a
simple sky/floor environment. All rays of an image go through numpy as one batch, and each primitive traces only
the rays that enter its bounding sphere, so a 128×128 scene of ten objects takes about 15 ms.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

SPHERE, CUBE, CYLINDER = 0, 1, 2
_EPS = 1e-4


@dataclass
class Primitive:
    """A unit shape mapped into the world by ``p = centre + matrix @ q``.

    The unit shapes are the sphere ``|q| ≤ 1``, the cube ``max|q_i| ≤ 1`` and the cylinder ``q_x² + q_y² ≤ 1,
    |q_z| ≤ 1`` (axis along local z). ``colour`` is linear RGB in [0, 1]; ``metal`` switches to a mirror-like finish.
    """

    kind: int
    centre: np.ndarray
    matrix: np.ndarray
    colour: np.ndarray
    metal: bool = False
    inverse: np.ndarray = field(init=False, repr=False)
    bound: float = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.centre = np.asarray(self.centre, dtype=np.float64)
        self.matrix = np.asarray(self.matrix, dtype=np.float64)
        self.colour = np.broadcast_to(np.asarray(self.colour, dtype=np.float64), (3,)).copy()
        self.inverse = np.linalg.inv(self.matrix)
        # Radius of a sphere around the centre that holds the whole shape (the unit cube's corner is at √3).
        reach = {SPHERE: 1.0, CUBE: np.sqrt(3.0), CYLINDER: np.sqrt(2.0)}[self.kind]
        self.bound = float(np.linalg.norm(self.matrix, 2) * reach) * (1 + 1e-6)


@dataclass
class Light:
    """A directional light: ``direction`` points from the scene towards the light."""

    direction: np.ndarray
    intensity: float
    shadows: bool = False

    def __post_init__(self) -> None:
        d = np.asarray(self.direction, dtype=np.float64)
        self.direction = d / np.linalg.norm(d)


def rotation_z(angle: float) -> np.ndarray:
    """Rotation by ``angle`` radians about the world z (up) axis."""
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def rotation_x(angle: float) -> np.ndarray:
    """Rotation by ``angle`` radians about the x axis."""
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])


def rotation_y(angle: float) -> np.ndarray:
    """Rotation by ``angle`` radians about the y axis."""
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


@dataclass
class Camera:
    """A pinhole camera at ``eye`` looking at ``target`` with z up; ``fov`` is the full vertical field of view."""

    eye: np.ndarray
    target: np.ndarray
    fov: float

    def basis(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Unit (forward, right, up) vectors of the camera frame."""
        forward = np.asarray(self.target, np.float64) - np.asarray(self.eye, np.float64)
        forward /= np.linalg.norm(forward)
        right = np.cross(forward, [0.0, 0.0, 1.0])
        right /= np.linalg.norm(right)
        return forward, right, np.cross(right, forward)

    def depth(self, point: np.ndarray) -> float:
        """Distance of ``point`` from the camera along the viewing axis (CLEVR's pixel-coordinate depth)."""
        return float(np.dot(np.asarray(point, np.float64) - self.eye, self.basis()[0]))

    def project(self, point: np.ndarray) -> tuple[float, float]:
        """Normalised image coordinates (x right, y down, both in [0, 1] inside the frame) of a world point."""
        forward, right, up = self.basis()
        rel = np.asarray(point, np.float64) - self.eye
        half = np.tan(np.radians(self.fov) / 2)
        z = np.dot(rel, forward)
        return 0.5 + np.dot(rel, right) / (z * half) / 2, 0.5 - np.dot(rel, up) / (z * half) / 2

    def rays(self, size: int, pixels: np.ndarray | None = None, offset: tuple[float, float] = (0.5, 0.5)) -> np.ndarray:
        """Unit ray directions (P, 3) through the point ``offset`` (x, y in pixels from the pixel's top-left corner)
        of each pixel of a square ``size × size`` image: every pixel row-major, or the flat indices ``pixels``."""
        forward, right, up = self.basis()
        half = np.tan(np.radians(self.fov) / 2)
        flat = np.arange(size * size) if pixels is None else np.asarray(pixels)
        x = ((flat % size + offset[0]) / size * 2 - 1) * half
        y = -((flat // size + offset[1]) / size * 2 - 1) * half
        d = forward[None] + x[:, None] * right[None] + y[:, None] * up[None]
        return d / np.linalg.norm(d, axis=1, keepdims=True)


def intersect(prim: Primitive, origin: np.ndarray, dirs: np.ndarray) -> np.ndarray:
    """Ray parameter of the first hit with ``prim`` for unit rays ``origin + t·dirs`` (inf where missed).

    ``origin`` is (3,) or (P, 3). Only rays that pass through the primitive's bounding sphere are traced exactly,
    which is most of the speed: an object covers a small part of the image.
    """
    to_centre = prim.centre - origin
    if to_centre.ndim == 1:
        along = dirs @ to_centre  # ray parameter of the point closest to the centre
        miss2 = to_centre @ to_centre - along**2  # squared distance of the ray from the centre
    else:
        along = np.einsum("ij,ij->i", to_centre, dirs)
        miss2 = np.einsum("ij,ij->i", to_centre, to_centre) - along**2
    t = np.full(len(dirs), np.inf)
    near = np.flatnonzero((miss2 <= prim.bound**2) & (along > -prim.bound))
    if len(near):
        t[near] = _intersect_exact(prim, origin if np.ndim(origin) == 1 else origin[near], dirs[near])
    return t


def _intersect_exact(prim: Primitive, origin: np.ndarray, dirs: np.ndarray) -> np.ndarray:
    """:func:`intersect` without the bounding-sphere test. The rays are mapped into the primitive's unit space
    without renormalising, so ``t`` is the world-space parameter and hits of different primitives compare."""
    o = (origin - prim.centre) @ prim.inverse.T
    d = dirs @ prim.inverse.T
    if o.ndim == 1:
        o = np.broadcast_to(o, d.shape)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        if prim.kind == SPHERE:
            a = np.einsum("ij,ij->i", d, d)
            b = np.einsum("ij,ij->i", o, d)
            c = np.einsum("ij,ij->i", o, o) - 1.0
            t = (-b - np.sqrt(b * b - a * c)) / a
            return np.where(t > _EPS, t, np.inf)  # NaN (no root) compares False
        if prim.kind == CUBE:
            t1, t2 = (-1.0 - o) / d, (1.0 - o) / d
            near = np.nanmax(np.minimum(t1, t2), axis=1)
            far = np.nanmin(np.maximum(t1, t2), axis=1)
            return np.where((near <= far) & (near > _EPS), near, np.inf)
        # Cylinder: the side (a circle in x, y) limited to |z| ≤ 1, and the two caps.
        a = d[:, 0] ** 2 + d[:, 1] ** 2
        b = o[:, 0] * d[:, 0] + o[:, 1] * d[:, 1]
        c = o[:, 0] ** 2 + o[:, 1] ** 2 - 1.0
        side = (-b - np.sqrt(b * b - a * c)) / a
        side = np.where((side > _EPS) & (np.abs(o[:, 2] + side * d[:, 2]) <= 1.0), side, np.inf)
        bottom, top = (-1.0 - o[:, 2]) / d[:, 2], (1.0 - o[:, 2]) / d[:, 2]
        cap = np.minimum(np.where(bottom > _EPS, bottom, np.inf), np.where(top > _EPS, top, np.inf))
        cx, cy = o[:, 0] + cap * d[:, 0], o[:, 1] + cap * d[:, 1]
        cap = np.where(np.isfinite(cap) & (cx * cx + cy * cy <= 1.0), cap, np.inf)
        return np.fmin(side, cap)  # fmin ignores the NaN of rays that miss the side


def normals(prim: Primitive, points: np.ndarray) -> np.ndarray:
    """Unit outward world normals of ``prim`` at surface points (P, 3)."""
    q = (points - prim.centre) @ prim.inverse.T
    if prim.kind == SPHERE:
        n = q
    elif prim.kind == CUBE:
        axis = np.argmax(np.abs(q), axis=1)
        n = np.zeros_like(q)
        n[np.arange(len(q)), axis] = np.sign(q[np.arange(len(q)), axis])
    else:
        # A hit point is on a cap when it is nearer the cap plane than the curved side.
        on_cap = 1.0 - np.abs(q[:, 2]) < 1.0 - np.sqrt(q[:, 0] ** 2 + q[:, 1] ** 2)
        zero = np.zeros(len(q))
        n = np.where(on_cap[:, None], np.stack([zero, zero, np.sign(q[:, 2])], 1),
                     np.stack([q[:, 0], q[:, 1], zero], 1))
    # Normals transform with the inverse transpose of the shape's linear map.
    n = n @ prim.inverse
    return n / np.linalg.norm(n, axis=1, keepdims=True)


@dataclass
class Lighting:
    """Lights, ambient term and the environment a metal reflects (floor below the horizon, sky above)."""

    lights: list[Light]
    ambient: float = 0.25
    sky: float = 0.9
    specular: float = 0.5
    shininess: float = 30.0
    shadow_blur: int = 2  # half-width in pixels of the box blur that softens floor shadows


def _box_blur(img: np.ndarray, radius: int) -> np.ndarray:
    """Separable box blur of a 2-D array with edge padding."""
    if radius <= 0:
        return img
    k = 2 * radius + 1
    for axis in (0, 1):
        pad = [(0, 0), (0, 0)]
        pad[axis] = (radius, radius)
        c = np.cumsum(np.pad(img, pad, mode="edge"), axis=axis)
        c = np.concatenate([np.zeros_like(c.take([0], axis=axis)), c], axis=axis)
        img = (c.take(np.arange(k, c.shape[axis]), axis=axis) - c.take(np.arange(0, c.shape[axis] - k), axis=axis)) / k
    return img


def _first_hits(prims: list[Primitive], eye: np.ndarray, dirs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ray parameter and primitive index (−1: none) of the nearest primitive along each ray."""
    best_t = np.full(len(dirs), np.inf)
    best_id = np.full(len(dirs), -1, dtype=np.int64)
    for i, prim in enumerate(prims):
        t = intersect(prim, eye, dirs)
        closer = t < best_t
        best_t[closer], best_id[closer] = t[closer], i
    return best_t, best_id


def _shadow(prims: list[Primitive], points: np.ndarray, light: Light) -> np.ndarray:
    """1 where ``points`` see the light, 0 where a primitive blocks it."""
    blocked = np.zeros(len(points), dtype=bool)
    for prim in prims:
        # The bounding-sphere test of :func:`intersect`, cheaper here because every ray has the same direction.
        to_centre = prim.centre - points
        along = to_centre @ light.direction
        miss2 = np.einsum("ij,ij->i", to_centre, to_centre) - along**2
        near = np.flatnonzero((miss2 <= prim.bound**2) & (along > -prim.bound))
        if len(near):
            ray = np.broadcast_to(light.direction, (len(near), 3))
            blocked[near] |= np.isfinite(_intersect_exact(prim, points[near], ray))
    return 1.0 - blocked


def _shade(prims: list[Primitive], eye: np.ndarray, dirs: np.ndarray, hit_t: np.ndarray, hit_id: np.ndarray,
           lighting: Lighting, floor: np.ndarray, grid: int | None) -> np.ndarray:
    """Linear RGB (P, 3) seen along unit rays from ``eye`` whose nearest primitive hits are ``hit_t, hit_id``.

    The floor (z = 0) takes the rays that miss every primitive and go down; the rest see the sky. With ``grid``
    set, the rays are a ``grid × grid`` image and floor shadows are softened in image space; otherwise shadows stay
    hard (used for the few extra antialiasing rays).
    """
    colour = np.empty((len(dirs), 3))
    colour[:] = lighting.sky * floor

    # Floor: constant normal (0, 0, 1), no highlight, so only the shadows vary.
    with np.errstate(divide="ignore"):
        t_floor = np.where(dirs[:, 2] < 0, -eye[2] / dirs[:, 2], np.inf)
    on_floor = (hit_id < 0) & np.isfinite(t_floor)
    fl = np.flatnonzero(on_floor)
    floor_points = eye + t_floor[fl, None] * dirs[fl]
    floor_points[:, 2] = 1e-3
    light_sum = np.full(len(fl), lighting.ambient)
    for light in lighting.lights:
        if light.direction[2] <= 0:
            continue
        shade = np.ones(len(fl))
        if light.shadows and prims:
            shade = _shadow(prims, floor_points, light)
            if grid is not None:
                image = np.ones(grid * grid)
                image[fl] = shade
                shade = _box_blur(image.reshape(grid, grid), lighting.shadow_blur).reshape(-1)[fl]
        light_sum += light.intensity * light.direction[2] * shade
    colour[fl] = floor[None] * light_sum[:, None]

    # Objects: Lambert + Blinn-Phong highlight; metals have a weak diffuse term, a tight strong highlight and a
    # mirror image of a two-tone environment (sky above the horizon, floor below).
    ob = np.flatnonzero(hit_id >= 0)
    if len(ob) == 0:
        return colour
    d = dirs[ob]
    points = eye + hit_t[ob, None] * d
    n = np.empty_like(points)
    albedo = np.empty_like(points)
    metal = np.zeros(len(ob), dtype=bool)
    for i, prim in enumerate(prims):
        sel = hit_id[ob] == i
        if sel.any():
            n[sel] = normals(prim, points[sel])
            albedo[sel] = prim.colour
            metal[sel] = prim.metal
    start = points + n * 1e-3  # shadow rays leave slightly off the surface so they do not hit it again
    out = lighting.ambient * albedo
    diffuse_weight = np.where(metal, 0.25, 1.0)[:, None]
    spec_power = np.where(metal, lighting.shininess * 4, lighting.shininess)
    spec_weight = np.where(metal, 2.5, 1.0) * lighting.specular
    for light in lighting.lights:
        lit = np.clip(n @ light.direction, 0.0, None)
        if light.shadows:
            lit = lit * _shadow(prims, start, light)
        half = light.direction[None] - d
        half /= np.linalg.norm(half, axis=1, keepdims=True)
        spec = np.clip(np.einsum("ij,ij->i", n, half), 0, None) ** spec_power * spec_weight * (lit > 0)
        out += light.intensity * (diffuse_weight * albedo * lit[:, None] + spec[:, None])
    if metal.any():
        refl = d[metal] - 2 * np.einsum("ij,ij->i", d[metal], n[metal])[:, None] * n[metal]
        up = np.clip(refl[:, 2] * 3 + 0.5, 0, 1)[:, None]
        env = up * lighting.sky + (1 - up) * floor[None] * (lighting.ambient + 0.5)
        out[metal] += 0.6 * env * albedo[metal] + 0.1 * env
    colour[ob] = out
    return colour


def render(prims: list[Primitive], camera: Camera, lighting: Lighting, size: int, floor: np.ndarray,
           antialias: bool = True, min_visible: int = 0) -> tuple[np.ndarray, np.ndarray] | None:
    """Render a scene: linear RGB float image (size, size, 3) and primitive-id image (size, size; −1: floor/sky).

    With ``antialias``, pixels on a silhouette (an id differing from a neighbour's) are re-traced with four
    sub-pixel rays and averaged: smooth edges for about a third more rays, instead of 4× for full supersampling.
    Returns None, before any shading, when some primitive shows fewer than ``min_visible`` pixels.
    """
    eye = np.asarray(camera.eye, np.float64)
    floor = np.asarray(floor, np.float64)
    dirs = camera.rays(size)
    hit_t, hit_id = _first_hits(prims, eye, dirs)
    if min_visible and np.bincount(hit_id[hit_id >= 0], minlength=len(prims)).min() < min_visible:
        return None
    colour = _shade(prims, eye, dirs, hit_t, hit_id, lighting, floor, grid=size)
    ids = hit_id.reshape(size, size)
    if antialias:
        edge = np.zeros((size, size), dtype=bool)
        edge[:, 1:] |= ids[:, 1:] != ids[:, :-1]
        edge[:, :-1] |= ids[:, 1:] != ids[:, :-1]
        edge[1:] |= ids[1:] != ids[:-1]
        edge[:-1] |= ids[1:] != ids[:-1]
        where = np.flatnonzero(edge)
        if len(where):
            offsets = ((0.25, 0.25), (0.75, 0.25), (0.25, 0.75), (0.75, 0.75))
            sub = np.concatenate([camera.rays(size, where, off) for off in offsets])
            sub_t, sub_id = _first_hits(prims, eye, sub)
            sub_colour = _shade(prims, eye, sub, sub_t, sub_id, lighting, floor, grid=None)
            colour[where] = sub_colour.reshape(len(offsets), len(where), 3).mean(axis=0)
    return colour.reshape(size, size, 3), ids


def to_uint8(img: np.ndarray, gamma: float = 2.2) -> np.ndarray:
    """Linear [0, 1] colour to gamma-encoded uint8."""
    return np.round(np.clip(img, 0, 1) ** (1 / gamma) * 255).astype(np.uint8)
