"""Pure-numpy rendering of a scene: silhouettes with fill patterns on a light textured background.

Every object is drawn in its own small local window (meshgrid masks, no per-pixel Python loops)
and pasted at an integer anchor. The local coordinates depend only on the pixel offset from the
anchor and on the object's sub-pixel phase, so an object's drawn pixels are exactly the same
wherever it is placed: scenes.py uses `object_layers` to compute the tight bounding box, and
`render` draws exactly those pixels.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from vlcore.world.scenes import Scene, SceneObject

# Star: outer radius 1, inner radius _STAR_INNER (normalised units), one point up.
_STAR_INNER = 0.5
_CROSS_ARM = 0.36  # half-width of the cross arms, as a fraction of the half-extent
_RING_WIDTH = 2  # border width in pixels (erosion radius) of the "ring" pattern
_DARK = 0.35  # the pattern colour is the object colour times this


def _star_line() -> tuple[float, float]:
    """(d, alpha): the star edge from the outer vertex (1, 0) to the inner vertex, in polar form."""
    a = np.array([1.0, 0.0])
    b = _STAR_INNER * np.array([math.cos(math.pi / 5), math.sin(math.pi / 5)])
    e = b - a
    n = np.array([e[1], -e[0]]) / np.linalg.norm(e)
    if n @ a < 0:
        n = -n
    return float(n @ a), math.atan2(n[1], n[0])


_STAR_D, _STAR_ALPHA = _star_line()


def window_radius(obj: "SceneObject") -> int:
    """Half-size of the local window that contains the object whatever its rotation."""
    return int(math.ceil(math.hypot(obj.half_h, obj.half_w))) + 2


def shape_mask(shape: str, un: np.ndarray, vn: np.ndarray) -> np.ndarray:
    """Silhouette test in normalised object coordinates (u right, v down, extent [-1, 1])."""
    if shape == "ellipse":
        return un * un + vn * vn <= 1.0
    if shape == "rectangle":
        return (np.abs(un) <= 1.0) & (np.abs(vn) <= 1.0)
    if shape == "triangle":  # apex up
        return (vn >= -1.0) & (vn <= 1.0) & (np.abs(un) <= (vn + 1.0) * 0.5)
    if shape == "diamond":
        return np.abs(un) + np.abs(vn) <= 1.0
    if shape == "cross":
        au, av = np.abs(un), np.abs(vn)
        return ((au <= 1.0) & (av <= _CROSS_ARM)) | ((au <= _CROSS_ARM) & (av <= 1.0))
    if shape == "star":  # one point up
        r = np.hypot(un, vn)
        theta = np.arctan2(vn, un) + math.pi / 2  # 0 at the top point
        sector = 2 * math.pi / 5
        beta = np.abs(np.mod(theta + sector / 2, sector) - sector / 2)  # angle from nearest point
        return r <= _STAR_D / np.cos(beta - _STAR_ALPHA)
    raise ValueError(f"unknown shape {shape!r}")


def _erode(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary erosion by a disc (slicing, no loops over pixels)."""
    h, w = mask.shape
    padded = np.zeros((h + 2 * radius, w + 2 * radius), bool)
    padded[radius : radius + h, radius : radius + w] = mask
    out = mask.copy()
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            if dy * dy + dx * dx <= radius * radius and (dy or dx):
                out &= padded[radius + dy : radius + dy + h, radius + dx : radius + dx + w]
    return out


def object_layers(obj: "SceneObject", pattern: bool = True) -> tuple[np.ndarray, np.ndarray | None, int]:
    """(mask, dark, radius): bool [2R+1, 2R+1] silhouette and pattern marks in the local window.

    Local pixel (i, j) is image pixel (anchor_y - R + i, anchor_x - R + j). pattern=False skips
    the pattern (dark is None).
    """
    r = window_radius(obj)
    rel = np.arange(-r, r + 1, dtype=np.float64)
    y = rel[:, None] - obj.frac_y
    x = rel[None, :] - obj.frac_x
    ca, sa = math.cos(obj.angle), math.sin(obj.angle)
    u = ca * x + sa * y  # pixels, object frame
    v = -sa * x + ca * y
    mask = shape_mask(obj.shape, u / obj.half_w, v / obj.half_h)
    if not pattern:
        return mask, None, r
    pattern = obj.pattern
    if pattern == "plain":
        dark = np.zeros_like(mask)
    elif pattern == "horizontal stripes":
        dark = np.floor((v + obj.phase_v) / obj.period).astype(np.int64) % 2 == 1
    elif pattern == "vertical stripes":
        dark = np.floor((u + obj.phase_u) / obj.period).astype(np.int64) % 2 == 1
    elif pattern == "dots":
        p = 2.0 * obj.period
        du = np.mod(u + obj.phase_u, p) - p / 2
        dv = np.mod(v + obj.phase_v, p) - p / 2
        dark = du * du + dv * dv <= (0.3 * p) ** 2
    elif pattern == "checker":
        cu = np.floor((u + obj.phase_u) / (1.2 * obj.period)).astype(np.int64)
        cv = np.floor((v + obj.phase_v) / (1.2 * obj.period)).astype(np.int64)
        dark = (cu + cv) % 2 == 1
    elif pattern == "ring":
        dark = ~_erode(mask, _RING_WIDTH)
    elif pattern == "half":
        dark = v > 0
    else:
        raise ValueError(f"unknown pattern {pattern!r}")
    return mask, dark & mask, r


def paste_slices(anchor: int, r: int, size: int) -> tuple[slice, slice]:
    """(image slice, window slice) along one axis for a window of half-size r at `anchor`."""
    lo, hi = anchor - r, anchor + r + 1
    return slice(max(lo, 0), min(hi, size)), slice(max(lo, 0) - lo, min(hi, size) - lo)


def background(scene: "Scene", noise: bool = True) -> np.ndarray:
    """float32 [S, S, 3]: the scene's light background (flat when noise=False)."""
    s = scene.size
    base = np.asarray(scene.background_rgb, np.float32)
    img = np.broadcast_to(base, (s, s, 3)).astype(np.float32)
    if noise:
        # sum of plane waves amp * sin(a y + b x + ph), separable: sin(A + B) = sinA cosB + cosA sinB
        t = np.arange(s, dtype=np.float64) * (2 * np.pi / s)
        tex = np.zeros((s, s), np.float64)
        for amp, fy, fx, ph in scene.texture:
            a, b = fy * t + ph, fx * t
            tex += amp * (np.outer(np.sin(a), np.cos(b)) + np.outer(np.cos(a), np.sin(b)))
        img = img + tex.astype(np.float32)[:, :, None]
    return img


def render(scene: "Scene", size: int = 64, noise: bool = True) -> np.ndarray:
    """uint8 [size, size, 3]: the scene drawn; objects in order (object 0, the main one, first).

    noise=False gives the flat background and no pixel noise (used by tests to find the drawn
    pixels of each object).
    """
    if size != scene.size:
        raise ValueError(f"scene was sampled for size {scene.size}, asked to render at {size}")
    img = background(scene, noise)
    for obj in scene.objects:
        mask, dark, r = object_layers(obj)
        ys, wy = paste_slices(obj.anchor_y, r, size)
        xs, wx = paste_slices(obj.anchor_x, r, size)
        m = mask[wy, wx]
        d = dark[wy, wx]
        rgb = np.asarray(obj.rgb, np.float32)
        col = np.where(d[:, :, None], rgb * _DARK, rgb)
        region = img[ys, xs]
        img[ys, xs] = np.where(m[:, :, None], col, region)
    if noise:
        rng = np.random.default_rng(scene.noise_seed)
        # grey (luminance) pixel noise: mild, and keeps the PNGs small
        img += rng.standard_normal((size, size, 1), dtype=np.float32) * np.float32(scene.noise_std)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)
