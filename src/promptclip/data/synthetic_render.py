"""Rendering of the procedural synthetic world: coloured shapes on textured scenes, with exact masks.

Every image is a pure function of its :class:`SceneSpec` (shape, colour, scene, size, position, seed), so a
data set built from it needs no download, is identical on every machine and can be rendered on the fly.
Rendering is vectorised numpy over coordinate grids (implicit shape tests); randomness comes only from
generators seeded by the spec's integers, never from global state, so the pixels do not depend on the order
in which images are rendered.

The foreground mask is exact: it is the set of pixels whose value differs from the background rendered
alone (``render_background(spec.scene, spec.seed)``), which is what foreground/background decoupling needs.
Each object carries a one-pixel outline in a colour that contrasts with its fill, so no colour disappears
into a scene of the same hue.

The tasks, captions and exports built on these images are in :mod:`promptclip.data.synthetic`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

__all__ = [
    "ALL_SCENES",
    "ALL_SHAPES",
    "COLOURS",
    "KINDS",
    "MARKINGS",
    "PLAIN_SCENE",
    "SCENES",
    "SHAPES",
    "SIZE_RANGE",
    "Kind",
    "SceneSpec",
    "check_image_size",
    "contact_sheet",
    "render",
    "render_background",
    "render_batch",
]

SHAPES: tuple[str, ...] = (
    "circle",
    "square",
    "triangle",
    "star",
    "cross",
    "heart",
    "diamond",
    "ring",
    "hexagon",
    "crescent",
)

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 35, 35),
    "green": (40, 185, 65),
    "blue": (35, 75, 225),
    "yellow": (245, 220, 35),
    "purple": (140, 55, 195),
    "orange": (250, 140, 25),
    "pink": (250, 135, 195),
    "white": (248, 248, 248),
    "black": (18, 18, 18),
    "cyan": (35, 215, 225),
}

SCENES: tuple[str, ...] = (
    "grass",
    "sky",
    "brick wall",
    "water",
    "sand",
    "snow",
    "forest",
    "night sky",
    "road",
    "tiled floor",
)

#: Markings drawn inside a silhouette in a contrasting shade of the fill; a kind is a silhouette and a marking.
MARKINGS: tuple[str, ...] = ("stripes", "spots", "eye")

# Names with one token each in CLIP's vocabulary, unrelated to what they name: a kind can only be learned
# from captions, and no two kinds share a word.
_KIND_NAMES: tuple[str, ...] = (
    "dax", "toma", "kiki", "mog", "jeb", "mib", "quen", "zeb", "dorf", "lox",
    "vex", "pim", "tuk", "zog", "nib", "wim", "bop", "zin", "tik", "lum",
    "dov", "fim", "lek", "nuk", "ovo", "pex", "raz", "tob", "vox", "wiz",
)  # fmt: skip


@dataclass(frozen=True)
class Kind:
    """What a kind looks like: its silhouette (one of SHAPES), its marking and its own colour."""

    silhouette: str
    marking: str
    colour: str


def _assign_kinds() -> dict[str, Kind]:
    """Every (silhouette, marking) pair gets one name and a colour. Each colour is worn by three kinds with
    three different silhouettes and markings, so telling two kinds of one colour apart is a fine-grained
    task; a fixed shuffle keeps names apart from looks."""
    colours = tuple(COLOURS)
    kinds = [
        Kind(shape, marking, colours[(s + 7 * m) % len(colours)])
        for m, marking in enumerate(MARKINGS)
        for s, shape in enumerate(SHAPES)
    ]
    order = np.random.default_rng(20261206).permutation(len(kinds))
    return {name: kinds[int(i)] for name, i in zip(_KIND_NAMES, order, strict=True)}


#: The 30 kinds of the world, by pseudo-word name.
KINDS: dict[str, Kind] = _assign_kinds()

#: Every value a spec's ``shape`` may take: the plain shapes, then the kinds.
ALL_SHAPES: tuple[str, ...] = SHAPES + tuple(KINDS)

#: A flat grey at CLIP's mean colour: what a foreground-only view puts around the object. Pretraining shows
#: it; no downstream task uses it as a scene.
PLAIN_SCENE = "plain"

#: Every value a spec's ``scene`` may take.
ALL_SCENES: tuple[str, ...] = (*SCENES, PLAIN_SCENE)

#: Object size, as the diameter of the object's bounding circle over the image side.
SIZE_RANGE: tuple[float, float] = (0.3, 0.7)

_OUTLINE_DARK = np.array([25.0, 25.0, 25.0], dtype=np.float32)
_OUTLINE_LIGHT = np.array([235.0, 235.0, 235.0], dtype=np.float32)
_MAX_TILT_DEG = 15.0
_COLOUR_JITTER = 12.0


# --------------------------------------------------------------------------------------------------- specs


@dataclass(frozen=True)
class SceneSpec:
    """Everything that determines one image.

    ``size`` is the diameter of the object's bounding circle and ``cx``/``cy`` its centre, all as fractions
    of the image side (``cy`` grows downwards). ``seed`` drives the background texture and the object's
    small nuisances (tilt, colour jitter, brightness); it must be a non-negative integer.
    """

    shape: str
    colour: str
    scene: str
    size: float
    cx: float
    cy: float
    seed: int

    def __post_init__(self) -> None:
        _check_name("shape", self.shape, ALL_SHAPES)
        _check_name("colour", self.colour, tuple(COLOURS))
        _check_name("scene", self.scene, ALL_SCENES)
        if self.shape in KINDS and self.colour != KINDS[self.shape].colour:
            raise ValueError(
                f"SceneSpec: a {self.shape} is always {KINDS[self.shape].colour}, got colour {self.colour!r}"
            )
        if not 0.05 <= self.size <= 1.0:
            raise ValueError(f"SceneSpec.size must be in [0.05, 1] (fraction of the image), got {self.size}")
        for name, value in (("cx", self.cx), ("cy", self.cy)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"SceneSpec.{name} must be in [0, 1] (fraction of the image), got {value}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)) or self.seed < 0:
            raise ValueError(f"SceneSpec.seed must be a non-negative integer, got {self.seed!r}")


def _check_name(field_name: str, value: str, known: Sequence[str]) -> None:
    if value not in known:
        raise ValueError(f"SceneSpec.{field_name} {value!r} is unknown; choose one of: {', '.join(known)}")


# ------------------------------------------------------------------------------------------------ textures


@lru_cache(maxsize=64)
def _pixel_centres(n: int) -> np.ndarray:
    """Pixel centres in [0, 1] along one image axis."""
    return ((np.arange(n, dtype=np.float32) + 0.5) / n).astype(np.float32)


@lru_cache(maxsize=64)
def _interpolation_matrix(n: int, cells: int) -> np.ndarray:
    """[n, cells+1] weights that linearly interpolate a (cells+1)-point lattice at n pixel centres."""
    pos = _pixel_centres(n) * cells
    left = np.minimum(np.floor(pos).astype(np.int64), cells - 1)
    frac = pos - left
    weights = np.zeros((n, cells + 1), dtype=np.float32)
    rows = np.arange(n)
    weights[rows, left] = 1.0 - frac
    weights[rows, left + 1] = frac
    return weights


def _smooth_noise(rng: np.random.Generator, n: int, cells: int) -> np.ndarray:
    """Value noise in [0, 1]: a random lattice, bilinearly upsampled with two small matrix products."""
    weights = _interpolation_matrix(n, cells)
    lattice = rng.random((cells + 1, cells + 1), dtype=np.float32)
    return weights @ lattice @ weights.T


def _mix(low: Sequence[float], high: Sequence[float], t: np.ndarray) -> np.ndarray:
    """Per-pixel blend of two RGB colours, ``t`` in [0, 1] of shape [H, W] -> [H, W, 3]."""
    lo = np.asarray(low, dtype=np.float32)
    return lo + (np.asarray(high, dtype=np.float32) - lo) * t[..., None]


def _grass(rng: np.random.Generator, n: int) -> np.ndarray:
    # Blades: random per column, smooth along the column, so the texture shows vertical streaks.
    blades = _interpolation_matrix(n, 4) @ rng.random((5, n), dtype=np.float32)
    t = 0.55 * blades + 0.25 * rng.random((n, n), dtype=np.float32) + 0.2 * _smooth_noise(rng, n, 3)
    return _mix((35, 90, 25), (130, 185, 60), t)


def _sky(rng: np.random.Generator, n: int) -> np.ndarray:
    v = np.broadcast_to(_pixel_centres(n)[:, None], (n, n))
    base = _mix((40, 100, 200), (150, 200, 248), v)
    clouds = 0.6 * _smooth_noise(rng, n, 3) + 0.4 * _smooth_noise(rng, n, 6)
    cover = np.clip((clouds - 0.55) * 4.0, 0.0, 0.9)
    return base + (np.float32(250.0) - base) * cover[..., None]


def _brick_wall(rng: np.random.Generator, n: int) -> np.ndarray:
    u, v = _pixel_centres(n), _pixel_centres(n)
    rows_per_image, bricks_per_row = 8.0, 4.0
    row_pos = v * rows_per_image + rng.random(dtype=np.float32)
    row = np.floor(row_pos).astype(np.int64)
    col_pos = u[None, :] * bricks_per_row + 0.5 * (row[:, None] % 2) + rng.random(dtype=np.float32)
    col = np.floor(col_pos).astype(np.int64)
    shade = rng.random((int(rows_per_image) + 2, int(bricks_per_row) + 3), dtype=np.float32)[row[:, None], col]
    t = 0.8 * shade + 0.2 * rng.random((n, n), dtype=np.float32)
    img = _mix((130, 45, 30), (190, 90, 60), t)
    # Mortar lines about one pixel wide at any resolution.
    joint_h = (row_pos - row)[:, None] < 1.2 * rows_per_image / n
    joint_v = (col_pos - col) < 1.2 * bricks_per_row / n
    img[joint_h | joint_v] = (195, 190, 180)
    return img


def _water(rng: np.random.Generator, n: int) -> np.ndarray:
    u, v = _pixel_centres(n)[None, :], _pixel_centres(n)[:, None]
    phase = rng.random(3, dtype=np.float32) * np.float32(2 * np.pi)
    waves = np.sin(2 * np.pi * (6.0 * v + 0.15 * np.sin(2 * np.pi * 2.0 * u + phase[0])) + phase[1])
    t = 0.5 + 0.33 * waves + 0.17 * (_smooth_noise(rng, n, 4) - 0.5)
    img = _mix((15, 55, 115), (60, 140, 195), t)
    img[waves > 0.93] = (175, 215, 240)
    return img


def _sand(rng: np.random.Generator, n: int) -> np.ndarray:
    u, v = _pixel_centres(n)[None, :], _pixel_centres(n)[:, None]
    angle = rng.uniform(-0.5, 0.5)
    along = u * math.sin(angle) + v * math.cos(angle)
    ripples = np.sin(2 * np.pi * 5.0 * along + 2.5 * _smooth_noise(rng, n, 3))
    t = 0.45 + 0.2 * ripples + 0.35 * (rng.random((n, n), dtype=np.float32) - 0.5)
    return _mix((185, 155, 100), (240, 215, 165), t)


def _snow(rng: np.random.Generator, n: int) -> np.ndarray:
    t = 0.6 * _smooth_noise(rng, n, 3) + 0.4 * _smooth_noise(rng, n, 6)
    img = _mix((190, 205, 228), (250, 250, 255), t)
    img[rng.random((n, n), dtype=np.float32) > 0.97] = 255.0
    return img


def _forest(rng: np.random.Generator, n: int) -> np.ndarray:
    canopy = 0.6 * _smooth_noise(rng, n, 8) + 0.4 * rng.random((n, n), dtype=np.float32)
    img = _mix((12, 40, 18), (55, 115, 45), canopy)
    trunks = 4
    centres = rng.random(trunks, dtype=np.float32)
    tops = rng.uniform(0.15, 0.5, trunks).astype(np.float32)
    half_width = max(0.02, 0.75 / n)
    u, v = _pixel_centres(n), _pixel_centres(n)
    in_trunk = (np.abs(u[None, None, :] - centres[:, None, None]) < half_width) & (
        v[None, :, None] > tops[:, None, None]
    )
    bark = _mix((60, 40, 25), (95, 65, 40), rng.random((n, n), dtype=np.float32))
    trunk_pixels = in_trunk.any(axis=0)
    img[trunk_pixels] = bark[trunk_pixels]
    return img


def _night_sky(rng: np.random.Generator, n: int) -> np.ndarray:
    v = np.broadcast_to(_pixel_centres(n)[:, None], (n, n))
    img = _mix((4, 6, 22), (22, 30, 75), 0.8 * v + 0.2 * _smooth_noise(rng, n, 4))
    sparkle = rng.random((n, n), dtype=np.float32)
    stars = sparkle > 0.975
    img[stars] = (230.0 + 25.0 * (sparkle[stars, None] - 0.975) / 0.025) * np.ones(3, dtype=np.float32)
    return img


def _road(rng: np.random.Generator, n: int) -> np.ndarray:
    t = 0.5 + 0.3 * (rng.random((n, n), dtype=np.float32) - 0.5) + 0.25 * (_smooth_noise(rng, n, 4) - 0.5)
    img = _mix((50, 50, 55), (100, 100, 105), t)
    u, v = _pixel_centres(n), _pixel_centres(n)
    lane_x = rng.uniform(0.3, 0.7)
    half_width = max(0.03, 0.75 / n)
    dashes = ((v * 4.0 + rng.random(dtype=np.float32)) % 1.0) < 0.55
    lane = dashes[:, None] & (np.abs(u - lane_x) < half_width)[None, :]
    img[lane] = (240, 215, 55)
    return img


def _tiled_floor(rng: np.random.Generator, n: int) -> np.ndarray:
    u, v = _pixel_centres(n), _pixel_centres(n)
    tiles = 5.0
    pu, pv = u * tiles + rng.random(dtype=np.float32), v * tiles + rng.random(dtype=np.float32)
    checker = (np.floor(pv)[:, None] + np.floor(pu)[None, :]) % 2
    t = checker * 0.85 + 0.15 * rng.random((n, n), dtype=np.float32)
    img = _mix((210, 205, 195), (60, 70, 95), t)
    grout = ((pv % 1.0)[:, None] < 1.0 * tiles / n) | ((pu % 1.0)[None, :] < 1.0 * tiles / n)
    img[grout] = (150, 150, 150)
    return img


def _plain(rng: np.random.Generator, n: int) -> np.ndarray:
    return np.broadcast_to(np.array(_CLIP_MEAN_RGB, dtype=np.float32), (n, n, 3)).copy()


_CLIP_MEAN_RGB = (122.8, 116.7, 104.1)  # CLIP's normalisation mean x 255: zero after normalising

_SCENE_PAINTERS: dict[str, Callable[[np.random.Generator, int], np.ndarray]] = {
    "grass": _grass,
    "sky": _sky,
    "brick wall": _brick_wall,
    "water": _water,
    "sand": _sand,
    "snow": _snow,
    "forest": _forest,
    "night sky": _night_sky,
    "road": _road,
    "tiled floor": _tiled_floor,
    PLAIN_SCENE: _plain,
}


def render_background(scene: str, seed: int, image_size: int = 64) -> np.ndarray:
    """The scene alone, as uint8 [H, W, 3]; exactly the background that :func:`render` draws on."""
    _check_name("scene", scene, ALL_SCENES)
    check_image_size(image_size)
    rng = np.random.default_rng([int(seed), ALL_SCENES.index(scene)])
    img = _SCENE_PAINTERS[scene](rng, image_size)
    brightness = np.float32(1.0 if scene == PLAIN_SCENE else rng.uniform(0.9, 1.1))
    return np.clip(img * brightness, 0.0, 255.0).astype(np.uint8)


def check_image_size(image_size: int) -> None:
    if not isinstance(image_size, (int, np.integer)) or image_size < 8:
        raise ValueError(f"image_size must be an integer >= 8 pixels, got {image_size!r}")


# -------------------------------------------------------------------------------------------------- shapes
# Each test takes local coordinates (unit = object radius, y pointing down) and returns the inside mask.
# Every shape fits in the unit disc, so a tilt never pushes it outside its bounding circle.

_SQRT3 = math.sqrt(3.0)


def _circle(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return x * x + y * y <= 0.92**2


def _square(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.maximum(np.abs(x), np.abs(y)) <= 0.7


def _triangle(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    # Upward triangle with its vertices on the unit circle: apex (0, -1), base at y = 0.5.
    return (y <= 0.5) & (y >= _SQRT3 * np.abs(x) - 1.0)


def _star(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    # Fold the plane into the half-sector between an inner vertex (angle 0) and an outer vertex (36 deg),
    # where the star's edge is one straight segment from (inner, 0) to the outer tip.
    sector = 2 * np.pi / 5
    angle = np.arctan2(x, -y)  # 0 points up, so one tip points up
    folded = np.abs(np.mod(angle, sector) - sector / 2)  # 0 at the tip direction
    beta = sector / 2 - folded  # 0 at the inner vertex, 36 deg at the tip
    radius = np.hypot(x, y)
    px, py = radius * np.cos(beta), radius * np.sin(beta)
    inner, tip = 0.42, (math.cos(sector / 2), math.sin(sector / 2))
    # Inside when the point lies on the origin's side of the line through (inner, 0) and the tip.
    return (tip[0] - inner) * py - tip[1] * (px - inner) >= 0


def _cross(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    ax, ay = np.abs(x), np.abs(y)
    return ((ax <= 0.28) & (ay <= 0.92)) | ((ay <= 0.28) & (ax <= 0.92))


def _heart(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    # The classic quartic heart (x^2 + y^2 - 1)^3 - x^2 y^3 <= 0, y up, scaled and shifted into the disc.
    hx, hy = 1.3 * x, -1.3 * y + 0.2
    r2 = hx * hx + hy * hy - 1.0
    return r2 * r2 * r2 - hx * hx * hy * hy * hy <= 0


def _diamond(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    # Taller than wide, so a tilted square never passes for a diamond.
    return np.abs(x) / 0.6 + np.abs(y) / 0.98 <= 1.0


def _ring(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    r2 = x * x + y * y
    return (r2 <= 0.95**2) & (r2 >= 0.55**2)


def _hexagon(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    radius = 0.95
    ax, ay = np.abs(x), np.abs(y)
    return (ay <= 0.5 * _SQRT3 * radius) & (ax + ay / _SQRT3 <= radius)


def _crescent(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    disc = x * x + y * y <= 0.95**2
    bite = (x - 0.45) ** 2 + (y + 0.12) ** 2 <= 0.72**2
    return disc & ~bite


_SHAPE_TESTS: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "circle": _circle,
    "square": _square,
    "triangle": _triangle,
    "star": _star,
    "cross": _cross,
    "heart": _heart,
    "diamond": _diamond,
    "ring": _ring,
    "hexagon": _hexagon,
    "crescent": _crescent,
}


def _stripes(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.mod(y + 1.0, 0.5) < 0.22  # bands about a fifth of the object wide: visible at 20 px


def _spots(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    gx, gy = x / 0.55 - np.round(x / 0.55), y / 0.55 - np.round(y / 0.55)
    return gx * gx + gy * gy <= 0.36**2


def _eye(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return x * x + y * y <= 0.36**2


_MARKING_TESTS: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "stripes": _stripes,
    "spots": _spots,
    "eye": _eye,
}


def _silhouette_and_marking(shape: str, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inside mask of a shape or kind, and the pixels of its marking (empty for a plain shape)."""
    if shape in KINDS:
        kind = KINDS[shape]
        inside = _SHAPE_TESTS[kind.silhouette](x, y)
        return inside, inside & _MARKING_TESTS[kind.marking](x, y)
    inside = _SHAPE_TESTS[shape](x, y)
    return inside, np.zeros_like(inside)


def _object_nuisances(spec: SceneSpec) -> tuple[float, np.ndarray]:
    """Tilt (radians) and jittered fill colour, drawn from the spec's seed only."""
    rng = np.random.default_rng([int(spec.seed), 7919])
    tilt = math.radians(rng.uniform(-_MAX_TILT_DEG, _MAX_TILT_DEG))
    fill = np.asarray(COLOURS[spec.colour], dtype=np.float32) + rng.uniform(-_COLOUR_JITTER, _COLOUR_JITTER, 3).astype(
        np.float32
    )
    return tilt, np.clip(fill, 0.0, 255.0)


def _object_box(spec: SceneSpec, n: int) -> tuple[int, int, int, int]:
    """Pixel rows/cols [y0, y1) x [x0, x1) that contain the object's bounding circle."""
    radius = spec.size / 2
    x0, x1 = max(0, math.floor((spec.cx - radius) * n)), min(n, math.ceil((spec.cx + radius) * n))
    y0, y1 = max(0, math.floor((spec.cy - radius) * n)), min(n, math.ceil((spec.cy + radius) * n))
    return y0, y1, x0, x1


def _paint_object(img: np.ndarray, spec: SceneSpec) -> np.ndarray:
    """Draw the object into ``img`` (in place) and return its exact boolean mask."""
    n = img.shape[0]
    mask = np.zeros((n, n), dtype=bool)
    y0, y1, x0, x1 = _object_box(spec, n)
    if y1 <= y0 or x1 <= x0:
        return mask
    radius = spec.size / 2
    centres = _pixel_centres(n)
    dx = (centres[x0:x1] - spec.cx)[None, :] / radius
    dy = (centres[y0:y1] - spec.cy)[:, None] / radius
    tilt, fill = _object_nuisances(spec)
    cos_t, sin_t = math.cos(tilt), math.sin(tilt)
    local_x, local_y = cos_t * dx + sin_t * dy, cos_t * dy - sin_t * dx
    inside, marked = _silhouette_and_marking(spec.shape, local_x, local_y)
    if not inside.any():
        return mask
    # Soft top-lit shading keeps the object's hue while giving it some volume.
    shade = 1.0 + 0.12 * np.clip(-local_y, -1.0, 1.0)
    colour = np.clip(fill * shade[..., None], 0.0, 255.0)
    luminance = 0.299 * fill[0] + 0.587 * fill[1] + 0.114 * fill[2]
    # A marking is a darker shade of a light fill, or a lighter shade of a dark one.
    marking = fill * 0.35 if luminance > 100 else fill * 0.4 + 150.0
    colour[marked] = marking
    # Outline: object pixels with a 4-neighbour outside the object (or the image).
    padded = np.pad(inside, 1, constant_values=False)
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    colour[inside & ~interior] = _OUTLINE_DARK if luminance > 100 else _OUTLINE_LIGHT
    crop = img[y0:y1, x0:x1]
    before = crop.copy()
    crop[inside] = colour[inside].astype(np.uint8)
    # The mask promises that every object pixel differs from the background: where a drawn pixel happens
    # to equal the background exactly, flip the lowest bit of its red channel.
    same = inside & (crop == before).all(axis=-1)
    crop[same, 0] ^= 1
    mask[y0:y1, x0:x1] = inside
    return mask


def render(spec: SceneSpec, image_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Render one image and its exact foreground mask.

    Returns ``(image, mask)``: uint8 [H, W, 3] RGB and bool [H, W] with H = W = ``image_size``. The mask
    is True exactly on the pixels that differ from ``render_background(spec.scene, spec.seed, image_size)``.
    """
    image = render_background(spec.scene, spec.seed, image_size)
    mask = _paint_object(image, spec)
    return image, mask


def render_batch(specs: Sequence[SceneSpec], image_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Render many specs: uint8 [N, H, W, 3] images and bool [N, H, W] masks."""
    images = np.empty((len(specs), image_size, image_size, 3), dtype=np.uint8)
    masks = np.empty((len(specs), image_size, image_size), dtype=bool)
    for i, spec in enumerate(specs):
        images[i], masks[i] = render(spec, image_size)
    return images, masks


def contact_sheet(images: Sequence[np.ndarray], columns: int, gap: int = 2) -> np.ndarray:
    """Tile equally sized uint8 [H, W, 3] images into one grid image with ``gap`` white pixels between."""
    if not images:
        raise ValueError("contact_sheet needs at least one image")
    h, w = images[0].shape[:2]
    rows = -(-len(images) // columns)
    sheet = np.full((rows * (h + gap) - gap, columns * (w + gap) - gap, 3), 255, dtype=np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        sheet[r * (h + gap) : r * (h + gap) + h, c * (w + gap) : c * (w + gap) + w] = image
    return sheet
