"""A synthetic shapes dataset with a ground-truth object mask for every image.

Each image shows exactly one *target object* whose **shape** alone decides the label
(circle, square, triangle, star, cross, ring, crescent, heart), drawn at a random scale,
rotation and position, with a random colour and fill texture, over a textured background
that carries clutter: distractor shapes that belong to no class (thin lines, zigzags,
elongated ellipses, clusters of dots). Colours, textures and clutter are drawn
independently of the label, so the object is necessary to classify the image.

Drawing order and what the mask means:

1. background texture;
2. 2 to 5 *under* distractors (lines, zigzags, ellipses, dots) anywhere, so they may
   touch the object or pass beneath it: the object occludes them;
3. the object, filled with its texture. ``mask`` is the object's silhouette, i.e. exactly
   the pixels that ``render_object_mask`` paints for the object's parameters;
4. with probability 1/2, one or two 1-px *over* lines drawn across the image, which may
   cross the object. They do not change ``mask`` (it is the amodal silhouette, as a
   segmentation of "the object" would be); ``visible_mask`` = ``mask`` minus those line
   pixels, for metrics that want only the object pixels the model can see;
5. a little per-pixel noise, then clipping to [0, 1].

The object lies entirely inside the frame and its colour is at least ``MIN_CONTRAST``
(RGB Euclidean distance) from the background's mean colour and from every distractor's
colour, so every image is solvable by shape. Everything is a pure function of
``(seed, split, index)`` through a numpy ``Generator``; no global RNG is touched.

Drawing uses OpenCV without anti-aliasing, so masks are exact binary sets and an image
renders in well under a millisecond (``benchmarks/shapes_speed.py`` measures it).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable, Literal

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

CLASSES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "ring", "crescent", "heart")
"""Class names, in label order."""

MEAN: tuple[float, float, float] = (0.5061, 0.5028, 0.4969)
"""Per-channel mean of the un-normalised training images (5000 images, size 64, seed 0)."""

STD: tuple[float, float, float] = (0.2970, 0.2980, 0.2974)
"""Per-channel standard deviation of the same images."""

MIN_CONTRAST = 0.35
"""Least RGB distance between the object's mean colour and the background or a distractor."""

_SHIFT = 4  # fixed-point bits for cv2.fillPoly: sub-pixel vertex positions
_SPLITS = {"train": 0, "test": 1, "val": 2}
Split = Literal["train", "test", "val"]


# ------------------------------------------------------------------ shapes (unit radius, centred)
def _regular(n: int, phase: float = 0.0) -> np.ndarray:
    a = phase + 2 * np.pi * np.arange(n) / n
    return np.stack([np.cos(a), np.sin(a)], 1)


def _star(points: int = 5, inner: float = 0.42) -> np.ndarray:
    radii = np.tile([1.0, inner], points)
    a = -np.pi / 2 + np.pi * np.arange(2 * points) / points
    return np.stack([radii * np.cos(a), radii * np.sin(a)], 1)


def _cross(half_width: float = 0.32) -> np.ndarray:
    w = half_width
    return np.array([[-w, -1], [w, -1], [w, -w], [1, -w], [1, w], [w, w],
                     [w, 1], [-w, 1], [-w, w], [-1, w], [-1, -w], [-w, -w]], float)


def _heart(n: int = 48) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    pts = np.stack([x, y + 2.5], 1)  # roughly centre the bounding box
    return pts / np.abs(pts).max()


_CIRCLE = _regular(64)
# Each shape is a list of (polygon, fill): fill 1 adds to the silhouette, fill 0 cuts a hole.
SHAPES: dict[str, list[tuple[np.ndarray, int]]] = {
    "circle": [(_CIRCLE, 1)],
    "square": [(_regular(4, np.pi / 4) * 1.15, 1)],
    "triangle": [(_regular(3, -np.pi / 2) * 1.1, 1)],
    "star": [(_star(), 1)],
    "cross": [(_cross(), 1)],
    "ring": [(_CIRCLE, 1), (_CIRCLE * 0.55, 0)],
    "crescent": [(_CIRCLE, 1), (_CIRCLE * 0.85 + [0.45, 0.0], 0)],
    "heart": [(_heart() * 1.05, 1)],
}


# ------------------------------------------------------------------ parameters of one scene
@dataclass(frozen=True)
class ObjectParams:
    """Where and how the target object is drawn (pixel units)."""

    shape: str
    cx: float
    cy: float
    radius: float
    angle: float


@dataclass(frozen=True)
class Texture:
    """A fill pattern ``c1 + (c2 - c1) * t(x, y)`` with ``t`` in [0, 1]."""

    kind: str
    c1: np.ndarray
    c2: np.ndarray
    angle: float = 0.0
    period: float = 8.0
    phase: float = 0.0
    grid: np.ndarray | None = None  # low-resolution noise for kind == "blotch"


@dataclass(frozen=True)
class Distractor:
    """A clutter item that belongs to no class; ``points`` are pixel coordinates."""

    kind: str
    points: np.ndarray
    colour: tuple[float, float, float]
    thickness: int = 1
    axes: tuple[float, float] = (0.0, 0.0)
    angle: float = 0.0


@dataclass(frozen=True)
class Scene:
    """Every random choice behind one image, so that rendering is a pure function."""

    size: int
    label: int
    obj: ObjectParams
    obj_texture: Texture
    background: Texture
    under: tuple[Distractor, ...]
    over: tuple[Distractor, ...]
    noise: np.ndarray = field(repr=False)


@dataclass(frozen=True)
class Sample:
    """One rendered image with its ground truth."""

    image: torch.Tensor  # float32 (3, H, W) in [0, 1], not normalised
    label: int
    mask: torch.Tensor  # bool (H, W): the object's silhouette
    visible_mask: torch.Tensor  # bool (H, W): mask minus pixels covered by over-lines
    scene: Scene


def scene_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of one image: independent streams for every (seed, split, index)."""
    if split not in _SPLITS:
        raise ValueError(f"unknown split {split!r}. Hint: use one of {sorted(_SPLITS)}.")
    return np.random.default_rng([int(seed), _SPLITS[split], int(index)])


def _colour(rng: np.random.Generator) -> np.ndarray:
    return rng.random(3, dtype=np.float32)


def _far_colour(rng: np.random.Generator, refs: tuple[np.ndarray, ...], tries: int = 32) -> np.ndarray:
    """A random colour at least MIN_CONTRAST from every colour in ``refs`` (rejection sampling)."""
    for _ in range(tries):
        c = _colour(rng)
        if all(np.linalg.norm(c - r) >= MIN_CONTRAST for r in refs):
            return c
    # Fall back to the colour opposite the first reference: >= 0.45 away in every channel.
    return (refs[0] < 0.5).astype(np.float32) * 0.9 + 0.05


def _texture(rng: np.random.Generator, c1: np.ndarray, c2: np.ndarray, kinds: tuple[str, ...], size: int,
             periods: tuple[float, float]) -> Texture:
    kind = kinds[rng.integers(len(kinds))]
    grid = rng.random((size // 8 + 2, size // 8 + 2), dtype=np.float32) if kind == "blotch" else None
    return Texture(kind, c1, c2, angle=float(rng.uniform(0, np.pi)), period=float(rng.uniform(*periods)),
                   phase=float(rng.uniform(0, 2 * np.pi)), grid=grid)


def _sample_object(rng: np.random.Generator, size: int, label: int) -> ObjectParams:
    radius = float(rng.uniform(0.15, 0.30) * size)
    margin = radius * 1.16 + 1  # the largest shape reaches 1.15 radii from its centre
    cx, cy = rng.uniform(margin, size - margin, 2)
    return ObjectParams(CLASSES[label], float(cx), float(cy), radius, float(rng.uniform(0, 2 * np.pi)))


def _sample_distractor(rng: np.random.Generator, size: int, colour: np.ndarray, over: bool = False) -> Distractor:
    c = tuple(float(v) for v in colour)
    kind = "line" if over else ("line", "zigzag", "ellipse", "dots")[rng.integers(4)]
    if kind == "line":
        p0 = rng.uniform(0, size, 2)
        a, length = rng.uniform(0, 2 * np.pi), rng.uniform(0.3, 1.0) * size
        pts = np.stack([p0, p0 + length * np.array([np.cos(a), np.sin(a)])])
        return Distractor(kind, pts, c, thickness=1 if over else int(rng.integers(1, 4)))
    if kind == "zigzag":
        pts = rng.uniform(0, size, 2) + np.cumsum(rng.normal(0, size * 0.15, (int(rng.integers(3, 6)), 2)), 0)
        return Distractor(kind, pts, c, thickness=int(rng.integers(1, 3)))
    if kind == "ellipse":
        a = rng.uniform(0.06, 0.18) * size
        return Distractor(kind, rng.uniform(0, size, (1, 2)), c, axes=(a, a / rng.uniform(2.5, 4.5)),
                          angle=float(rng.uniform(0, 180)))
    centre = rng.uniform(0, size, 2)
    pts = centre + rng.normal(0, size * 0.08, (int(rng.integers(3, 9)), 2))
    return Distractor(kind, pts, c, thickness=int(rng.integers(1, 3)))


def sample_scene(rng: np.random.Generator, size: int = 64, label: int | None = None) -> Scene:
    """Draw every random choice of one image (label uniform unless given)."""
    label = int(rng.integers(len(CLASSES))) if label is None else label
    obj = _sample_object(rng, size, label)
    b1 = _colour(rng)
    b2 = np.clip(b1 + rng.uniform(-0.3, 0.3, 3), 0, 1).astype(np.float32)
    o1 = _far_colour(rng, (b1, b2))
    o2 = np.clip(o1 + rng.uniform(-0.2, 0.2, 3), 0, 1).astype(np.float32)
    o_mean = (o1 + o2) / 2
    under = tuple(_sample_distractor(rng, size, _far_colour(rng, (o_mean,))) for _ in range(rng.integers(2, 6)))
    n_over = int(rng.integers(1, 3)) if rng.random() < 0.5 else 0
    over = tuple(_sample_distractor(rng, size, _far_colour(rng, (o_mean,)), over=True) for _ in range(n_over))
    return Scene(
        size, label, obj,
        _texture(rng, o1, o2, ("flat", "stripes", "checker", "blotch"), size, (3.0, 8.0)),
        _texture(rng, b1, b2, ("stripes", "checker", "blotch", "gradient"), size, (0.1 * size, 0.25 * size)),
        under, over, rng.uniform(-0.03, 0.03, (size, size, 3)).astype(np.float32),
    )


# ------------------------------------------------------------------ rendering
@functools.lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    return x, y


def _pattern(tex: Texture, size: int) -> np.ndarray | float:
    """t(x, y) in [0, 1] of a texture, (H, W) float32, or 0.0 for a flat fill."""
    if tex.kind == "flat":
        return 0.0
    if tex.kind == "blotch":
        return cv2.resize(tex.grid, (size, size), interpolation=cv2.INTER_LINEAR)
    x, y = _grid(size)
    ca, sa = np.float32(np.cos(tex.angle)), np.float32(np.sin(tex.angle))
    u = x * ca + y * sa
    if tex.kind == "stripes":
        return 0.5 + 0.5 * np.sin(u * np.float32(2 * np.pi / tex.period) + np.float32(tex.phase))
    if tex.kind == "checker":
        v = y * ca - x * sa
        return ((np.floor(u / tex.period) + np.floor(v / tex.period)) % 2).astype(np.float32)
    return (u - u.min()) / (u.max() - u.min())  # gradient


def _fill(tex: Texture, size: int) -> np.ndarray:
    t = _pattern(tex, size)
    t = t[..., None] if isinstance(t, np.ndarray) else t
    return np.broadcast_to(tex.c1 + (tex.c2 - tex.c1) * t, (size, size, 3)).astype(np.float32)


def _fixed(points: np.ndarray) -> np.ndarray:
    """Pixel coordinates to cv2's fixed-point int32 (sub-pixel precision, ``_SHIFT`` bits)."""
    return np.round(points * (1 << _SHIFT)).astype(np.int32)


def render_object_mask(obj: ObjectParams, size: int) -> np.ndarray:
    """The silhouette of an object alone on a blank ``size`` x ``size`` canvas (bool H x W)."""
    ca, sa = np.cos(obj.angle), np.sin(obj.angle)
    rot = np.array([[ca, -sa], [sa, ca]])
    canvas = np.zeros((size, size), np.uint8)
    for poly, value in SHAPES[obj.shape]:
        pts = poly @ rot.T * obj.radius + [obj.cx, obj.cy]
        cv2.fillPoly(canvas, [_fixed(pts)], value, lineType=cv2.LINE_8, shift=_SHIFT)
    return canvas.astype(bool)


def _draw(canvas: np.ndarray, d: Distractor, colour: tuple[float, ...] | int) -> None:
    """Draw a distractor on ``canvas`` (a float image or a uint8 mask), in place."""
    if d.kind == "ellipse":
        centre = tuple(int(v) for v in _fixed(d.points[0]))
        axes = tuple(int(v) for v in _fixed(np.array(d.axes)))
        cv2.ellipse(canvas, centre, axes, d.angle, 0, 360, colour, -1, cv2.LINE_8, _SHIFT)
    elif d.kind == "dots":
        for p in _fixed(d.points):
            cv2.circle(canvas, (int(p[0]), int(p[1])), d.thickness << _SHIFT, colour, -1, cv2.LINE_8, _SHIFT)
    else:  # line, zigzag
        cv2.polylines(canvas, [_fixed(d.points)], False, colour, d.thickness, cv2.LINE_8, _SHIFT)


def render(scene: Scene, with_object: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render a scene: image (H, W, 3) float32 in [0, 1], mask and visible mask (H, W) bool.

    ``with_object=False`` renders the same scene without the object (the mask is still its
    silhouette); comparing both renders shows which pixels the object changed.
    """
    size = scene.size
    img = np.ascontiguousarray(_fill(scene.background, size))
    for d in scene.under:
        _draw(img, d, d.colour)
    mask = render_object_mask(scene.obj, size)
    if with_object:
        img = np.where(mask[..., None], _fill(scene.obj_texture, size), img)
    covered = np.zeros((size, size), np.uint8)
    for d in scene.over:
        _draw(img, d, d.colour)
        _draw(covered, d, 1)
    img = np.clip(img + scene.noise, 0.0, 1.0)
    return img, mask, mask & ~covered.astype(bool)


def make_sample(seed: int, split: str, index: int, size: int = 64) -> Sample:
    """Generate image ``index`` of ``split``; the same arguments always give the same sample."""
    scene = sample_scene(scene_rng(seed, split, index), size)
    img, mask, visible = render(scene)
    image = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))
    return Sample(image, scene.label, torch.from_numpy(mask), torch.from_numpy(visible), scene)


def normalize(image: torch.Tensor) -> torch.Tensor:
    """(x - MEAN) / STD per channel, for (3, H, W) or (N, 3, H, W) images in [0, 1]."""
    mean = torch.tensor(MEAN, dtype=image.dtype).view(3, 1, 1)
    std = torch.tensor(STD, dtype=image.dtype).view(3, 1, 1)
    return (image - mean) / std


class ShapesDataset(Dataset):
    """``n`` images of one split; item ``i`` is ``make_sample(seed, split, i, size)``.

    Args:
        split: "train", "test" or "val"; the splits are disjoint random streams.
        n: number of images.
        size: image side in pixels (shapes and clutter scale with it).
        seed: the dataset seed.
        normalize: return images normalised with ``MEAN``/``STD`` (the bundled models' input).
        transform: applied to the (possibly normalised) image tensor last.
        return_mask: return ``(image, label, mask)`` instead of ``(image, label)``.

    ``dataset.sample(i)`` returns the full ``Sample`` (masks and scene parameters).
    """

    classes = CLASSES
    mean = MEAN
    std = STD

    def __init__(self, split: Split = "train", n: int = 10_000, size: int = 64, seed: int = 0, *,
                 normalize: bool = False, transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 return_mask: bool = False) -> None:
        scene_rng(seed, split, 0)  # validates the split name
        if size < 16 or n < 0:
            raise ValueError(f"ShapesDataset(n={n}, size={size}) is invalid. Hint: use n >= 0 and size >= 16.")
        self.split, self.n, self.size, self.seed = split, n, size, seed
        self.normalize, self.transform, self.return_mask = normalize, transform, return_mask

    def __len__(self) -> int:
        return self.n

    def sample(self, index: int) -> Sample:
        """The full sample ``index`` (raw image in [0, 1], masks, scene)."""
        if not 0 <= index < self.n:
            raise IndexError(f"index {index} out of range for a ShapesDataset of {self.n} images. "
                             "Hint: use 0 <= index < len(dataset).")
        return make_sample(self.seed, self.split, index, self.size)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int] | tuple[torch.Tensor, int, torch.Tensor]:
        s = self.sample(index)
        image = normalize(s.image) if self.normalize else s.image
        image = self.transform(image) if self.transform is not None else image
        return (image, s.label, s.mask) if self.return_mask else (image, s.label)


def generate_batch(start: int, count: int, *, split: Split = "train", size: int = 64, seed: int = 0,
                   normalized: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images ``start .. start+count-1`` stacked: (N, 3, H, W) float32, labels (N,), masks (N, H, W)."""
    samples = [make_sample(seed, split, i, size) for i in range(start, start + count)]
    images = torch.stack([s.image for s in samples])
    labels = torch.tensor([s.label for s in samples])
    masks = torch.stack([s.mask for s in samples])
    return (normalize(images) if normalized else images), labels, masks
