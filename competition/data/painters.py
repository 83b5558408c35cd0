"""Defect painters and the standard artificial anomalies for self-supervised training.

`paint_defect` draws the defect kinds of MVTec AD-style inspection data (scratch, crack, hole,
stain, cut/fold, missing pattern) at a chosen severity; `cutpaste` follows CutPaste (Li et al.,
CVPR 2021) and `perlin_anomaly` follows DRAEM (Zavrtanik et al., ICCV 2021). Every function takes
a uint8 image (H, W) or (H, W, C), never modifies it, and returns a new image plus a uint8 0/255
mask of the region it changed: pixels outside the mask are bit-identical to the input, and some
pixel inside it differs. No painter raises on an image it cannot change (a flat or binary surface,
a tiny image): it tries other placements, then another kind, and logs the substitution.
"""
from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable

import cv2
import numpy as np

from competition.data.textures import OTHER_FAMILIES, make_texture, rotate_and_crop
from competition.preprocess import rotate

DEFECT_KINDS: tuple[str, ...] = ("scratch", "crack", "hole", "stain", "cut", "missing_pattern")

# A painter's coverage above this counts as defect; below it the pixel is left untouched, so the
# mask is exactly the set of pixels that may differ from the input.
_COVERAGE_THRESHOLD = 0.15

# Placement: (float image (H, W, C), rng) -> the defect's centre as (x, y) pixel coordinates.
_Placement = Callable[[np.ndarray, np.random.Generator], np.ndarray]
# Painter signature: (float image (H, W, C), rng, severity, placement) -> (target image, coverage in
# [0, 1], strength in (0, 1]). The result is input + (target - input) * coverage * strength.
_Painter = Callable[[np.ndarray, np.random.Generator, float, _Placement], tuple[np.ndarray, np.ndarray, float]]

RANDOM_PLACEMENTS = 10  # draws of the asked kind anywhere on the image (the first draws, always)
GUIDED_PLACEMENTS = 10  # then draws centred where the image has structure to change
FALLBACK_PLACEMENTS = 3  # then draws of each other kind, in a random order

log = logging.getLogger(__name__)
# (asked kind, what was painted instead) -> count, in this process; each pair is logged once.
_substitutions: Counter[tuple[str, str]] = Counter()


def substitution_counts() -> dict[tuple[str, str], int]:
    """How often, in this process, a painter could not change an image and another kind stood in."""
    return dict(_substitutions)


def paint_defect(image: np.ndarray, kind: str, rng: np.random.Generator,
                 severity: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Paint one defect of `kind` on a copy of `image`; returns (new image, 0/255 mask).

    `severity` 0 gives an obvious defect (large, high contrast), 1 a subtle one (small, low
    contrast); None draws it uniformly from [0, 1], so about a third of defects are subtle.

    A draw that changes nothing visible (a crack on a black patch, a smeared-out pattern on a flat
    region) is redrawn elsewhere; when the image gives `kind` nothing to change, another kind
    stands in (see `substitution_counts`), so a training run never stops on an awkward image.
    """
    try:
        painter = _PAINTERS[kind]
    except KeyError:
        raise ValueError(f"unknown defect kind {kind!r}; allowed: {', '.join(DEFECT_KINDS)}") from None
    work = _as_float_hwc(image)
    severity = check_severity(rng.uniform(0.0, 1.0) if severity is None else severity)
    painted = _paint_visible(image, work, painter, rng, severity, _random_centre, RANDOM_PLACEMENTS)
    if painted is None:
        # Blurring or warping a constant patch leaves it constant: centre the defect on structure.
        guided = _structure_placement(work)
        if guided is not None:
            painted = _paint_visible(image, work, painter, rng, severity, guided, GUIDED_PLACEMENTS)
    if painted is not None:
        return painted
    return _substitute(image, work, kind, rng, severity)


def _paint_visible(image: np.ndarray, work: np.ndarray, painter: _Painter, rng: np.random.Generator,
                   severity: float, place: _Placement, attempts: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The first of `attempts` draws that changes a pixel, as (new image, 0/255 mask); None if none did."""
    for _ in range(attempts):
        target, coverage, strength = painter(work, rng, severity, place)
        mask = coverage >= _COVERAGE_THRESHOLD
        blended = work + (target - work) * (coverage * strength)[..., None]
        out = _to_uint8_like(np.where(mask[..., None], blended, work), image)
        # A defect that rounds away to nothing (e.g. a dark crack on a black patch) is redrawn.
        if mask.any() and np.any(out != image):
            return out, _mask_to_uint8(mask)
    return None


def _substitute(image: np.ndarray, work: np.ndarray, asked: str, rng: np.random.Generator,
                severity: float) -> tuple[np.ndarray, np.ndarray]:
    """Another defect kind in place of `asked`, which could not change `image`; an inverted spot if none can.

    The other kinds are tried in a random order; most lighten or darken towards a contrasting
    value, which changes even a constant image.
    """
    others = [kind for kind in DEFECT_KINDS if kind != asked]
    painted, used = None, "inverted_spot"
    for index in rng.permutation(len(others)):
        painted = _paint_visible(image, work, _PAINTERS[others[int(index)]], rng, severity, _random_centre,
                                 FALLBACK_PLACEMENTS)
        if painted is not None:
            used = others[int(index)]
            break
    if painted is None:
        # Inverting a pixel always changes it (255 - v == v has no integer solution), so this cannot fail.
        painted = _paint_visible(image, work, _inverted_spot, rng, severity, _random_centre, 1)
    _substitutions[(asked, used)] += 1
    if _substitutions[(asked, used)] == 1:
        log.warning("could not paint a visible %r on a %s image; painted a %r defect instead "
                    "(logged once per pair of kinds in this process)", asked, image.shape, used)
    return painted


def cutpaste(image: np.ndarray, rng: np.random.Generator, scar: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """CutPaste: copy a rectangular patch, colour-jitter it, paste it elsewhere.

    Patch area is 2-15% of the image with aspect ratio in [0.3, 3.3] (the paper's defaults). The
    scar variant cuts a thin long patch (2-16 x 10-25 px at 256 px, scaled with the image) and
    rotates it by up to 45 degrees before pasting. A patch from a constant surface pasted onto the
    same surface changes nothing (jitter scales black to black); after ten such draws a painted
    defect stands in.
    """
    work = _as_uint8_hwc(image)
    height, width = work.shape[:2]
    for _ in range(RANDOM_PLACEMENTS):
        out = work.copy()
        mask = np.zeros((height, width), bool)
        if scar:
            _paste_scar(work, out, mask, rng)
        else:
            _paste_rectangle(work, out, mask, rng)
        if mask.any() and np.any(out[mask] != work[mask]):
            return _restore_layout(out, image), _mask_to_uint8(mask)
    asked = "cutpaste_scar" if scar else "cutpaste"
    return _substitute(image, _as_float_hwc(image), asked, rng, float(rng.uniform(0.0, 1.0)))


def perlin_noise(shape: tuple[int, int], rng: np.random.Generator,
                 scale: tuple[int, int] | None = None) -> np.ndarray:
    """2-D gradient (Perlin) noise of `shape`, float32, roughly in [-1, 1].

    `scale` = number of noise periods along (height, width); None draws each as 2**k, k in 0..5,
    as DRAEM does.
    """
    height, width = int(shape[0]), int(shape[1])
    if scale is None:
        scale = (2 ** int(rng.integers(0, 6)), 2 ** int(rng.integers(0, 6)))
    periods_y, periods_x = max(1, int(scale[0])), max(1, int(scale[1]))
    angles = rng.uniform(0.0, 2 * np.pi, size=(periods_y + 1, periods_x + 1))
    gradients = np.stack([np.cos(angles), np.sin(angles)], axis=-1).astype(np.float32)
    pos_y = np.arange(height, dtype=np.float32) * periods_y / height
    pos_x = np.arange(width, dtype=np.float32) * periods_x / width
    cell_y, cell_x = pos_y.astype(np.int64), pos_x.astype(np.int64)
    frac_y, frac_x = (pos_y - cell_y)[:, None], (pos_x - cell_x)[None, :]

    def corner_dot(dy: int, dx: int) -> np.ndarray:
        grad = gradients[(cell_y + dy)[:, None], (cell_x + dx)[None, :]]
        return grad[..., 0] * (frac_y - dy) + grad[..., 1] * (frac_x - dx)

    def fade(t: np.ndarray) -> np.ndarray:
        return t * t * t * (t * (t * 6 - 15) + 10)

    fade_y, fade_x = fade(frac_y), fade(frac_x)
    top = corner_dot(0, 0) + fade_x * (corner_dot(0, 1) - corner_dot(0, 0))
    bottom = corner_dot(1, 0) + fade_x * (corner_dot(1, 1) - corner_dot(1, 0))
    return (np.sqrt(2.0) * (top + fade_y * (bottom - top))).astype(np.float32)


def perlin_anomaly(image: np.ndarray, rng: np.random.Generator, texture_source: np.ndarray | None = None,
                   beta: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """DRAEM anomaly: blend an augmented foreign texture into the image inside a Perlin-noise mask.

    The mask is rotated Perlin noise thresholded at 0.5 (redrawn until non-empty). The anomaly
    texture is `texture_source` (resized to the image) or, if None, a fresh texture from
    `OTHER_FAMILIES`; it gets three random DRAEM augmentations and is blended with opacity `beta`
    (drawn from [0.1, 1.0] if None): inside the mask, out = (1 - beta) * image + beta * anomaly.
    A draw that changes nothing (a flat source augmented to the image's own value) is redrawn;
    after ten, a painted defect stands in.
    """
    work = _as_uint8_hwc(image)
    height, width, channels = work.shape
    if beta is None:
        beta = float(rng.uniform(0.1, 1.0))
    if not 0.1 <= beta <= 1.0:
        raise ValueError(f"beta (anomaly opacity) must lie in [0.1, 1.0], got {beta}")
    for _ in range(RANDOM_PLACEMENTS):
        mask = _perlin_mask(height, width, rng)
        if texture_source is None:
            family = OTHER_FAMILIES[int(rng.integers(len(OTHER_FAMILIES)))]
            source = make_texture(family, (height, width), rng)
        else:
            source = cv2.resize(_as_uint8_hwc(texture_source), (width, height), interpolation=cv2.INTER_LINEAR)
        source = _match_channels(source.reshape(height, width, -1), channels)
        anomaly = _draem_augment(source, rng).astype(np.float32)
        base = work.astype(np.float32)
        blended = (1.0 - beta) * base + beta * anomaly
        out = np.where(mask[..., None], np.clip(blended + 0.5, 0, 255).astype(np.uint8), work)
        if np.any(out != work):
            return _restore_layout(out, image), _mask_to_uint8(mask)
    severity = float(np.clip((1.0 - beta) / 0.9, 0.0, 1.0))  # the inverse of random_anomaly's beta
    return _substitute(image, work.astype(np.float32), "perlin", rng, severity)


# ----------------------------------------------------------------------------------------------
# Image layout helpers
# ----------------------------------------------------------------------------------------------

def _as_uint8_hwc(image: np.ndarray) -> np.ndarray:
    """Validate a uint8 (H, W) or (H, W, C) image and view it as (H, W, C)."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise TypeError(f"images must be uint8, got {image.dtype}")
    if image.ndim == 2:
        return image[..., None]
    if image.ndim == 3 and image.shape[2] in (1, 3, 4):
        return image
    raise ValueError(f"image must be (H, W) or (H, W, 1|3|4), got shape {image.shape}")


def _as_float_hwc(image: np.ndarray) -> np.ndarray:
    return _as_uint8_hwc(image).astype(np.float32)


def _restore_layout(out_hwc: np.ndarray, like: np.ndarray) -> np.ndarray:
    return out_hwc.reshape(like.shape)


def _to_uint8_like(values: np.ndarray, like: np.ndarray) -> np.ndarray:
    return _restore_layout(np.clip(values + 0.5, 0, 255).astype(np.uint8), like)


def _mask_to_uint8(mask: np.ndarray) -> np.ndarray:
    return mask.astype(np.uint8) * 255


def _match_channels(rgb: np.ndarray, channels: int) -> np.ndarray:
    if rgb.shape[2] == channels:
        return rgb
    if channels == 3 and rgb.shape[2] == 4:
        return np.ascontiguousarray(rgb[..., :3])
    grey = rgb[..., :3].mean(axis=2, keepdims=True) if rgb.shape[2] >= 3 else rgb[..., :1]
    return np.repeat(grey, channels, axis=2).astype(rgb.dtype)


def _colour(rgb: tuple[float, float, float], channels: int) -> np.ndarray:
    """An RGB colour as a per-channel vector for an image with `channels` channels."""
    rgb = np.asarray(rgb, np.float32)
    if channels == 1:
        return np.array([rgb.mean()], np.float32)
    return np.concatenate([rgb, np.full(channels - 3, 255.0, np.float32)]) if channels > 3 else rgb


def check_severity(severity: float) -> float:
    severity = float(severity)
    if not 0.0 <= severity <= 1.0:
        raise ValueError(f"severity must lie in [0, 1] (0 obvious, 1 subtle), got {severity}")
    return severity


def _lerp(obvious: float, subtle: float, severity: float) -> float:
    return obvious + (subtle - obvious) * severity


# ----------------------------------------------------------------------------------------------
# Shared geometry
# ----------------------------------------------------------------------------------------------

def _defect_extent(work: np.ndarray, severity: float) -> float:
    """Characteristic defect size in px: half the short side when obvious, ~1/7 when subtle."""
    return min(work.shape[:2]) * _lerp(0.5, 0.14, severity)


def _strength(severity: float, rng: np.random.Generator) -> float:
    return float(np.clip(_lerp(0.95, 0.35, severity) * rng.uniform(0.9, 1.1), 0.05, 1.0))


def _line_px(work: np.ndarray) -> float:
    """Line thickness unit: 1 px at 128 px, 2 px at 256 px."""
    return max(1.0, min(work.shape[:2]) / 128.0)


def _random_centre(work: np.ndarray, rng: np.random.Generator, margin: float = 0.1) -> np.ndarray:
    height, width = work.shape[:2]
    return np.array([rng.uniform(margin, 1 - margin) * width, rng.uniform(margin, 1 - margin) * height])


def _structure_placement(work: np.ndarray) -> _Placement | None:
    """Centres drawn in proportion to local detail (|image - its blur|); None on a flat image.

    Binary boards and blank margins leave most random centres on a constant patch, where a
    smeared or warped pattern changes nothing; edges are where such a defect shows.
    """
    detail = np.abs(work - cv2.GaussianBlur(work, (0, 0), 2.0).reshape(work.shape)).sum(axis=2).ravel()
    total = float(detail.sum())
    if not total > 0:
        return None
    weights = detail / total
    width = work.shape[1]

    def place(work: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        index = int(rng.choice(len(weights), p=weights))
        return np.array([index % width + 0.5, index // width + 0.5])

    return place


def _wandering_path(centre: np.ndarray, length: float, n_points: int, turn_sd: float,
                    rng: np.random.Generator) -> np.ndarray:
    """(n, 2) x/y points of a path of `length` through `centre` whose heading drifts by `turn_sd`."""
    heading = rng.uniform(0, 2 * np.pi) + np.cumsum(rng.normal(0.0, turn_sd, n_points - 1))
    steps = np.stack([np.cos(heading), np.sin(heading)], axis=1) * (length / (n_points - 1))
    points = np.vstack([np.zeros((1, 2)), np.cumsum(steps, axis=0)])
    return points - points.mean(axis=0) + centre


def _draw_polyline(shape: tuple[int, int], points: np.ndarray, thickness: float) -> np.ndarray:
    """Anti-aliased polyline coverage in [0, 1] (sub-pixel precise via cv2's fixed-point shift)."""
    canvas = np.zeros(shape, np.float32)
    shift = 4
    pts = np.round(points * (1 << shift)).astype(np.int32).reshape(-1, 1, 2)
    cv2.polylines(canvas, [pts], False, 1.0, max(1, int(round(thickness))), cv2.LINE_AA, shift)
    return np.clip(canvas, 0.0, 1.0)


def _irregular_blob(shape: tuple[int, int], centre: np.ndarray, radius: float, roughness: float,
                    rng: np.random.Generator) -> np.ndarray:
    """Filled anti-aliased polygon: an ellipse whose radius wobbles with a few random harmonics."""
    theta = np.linspace(0, 2 * np.pi, 48, endpoint=False)
    wobble = np.zeros_like(theta)
    for harmonic in range(2, 6):
        wobble += rng.normal(0.0, roughness / harmonic) * np.cos(harmonic * theta + rng.uniform(0, 2 * np.pi))
    aspect = rng.uniform(0.5, 1.0)
    tilt = rng.uniform(0, np.pi)
    r = radius * np.clip(1.0 + wobble, 0.3, 2.0)
    local = np.stack([r * np.cos(theta), aspect * r * np.sin(theta)], axis=1)
    rotation = np.array([[np.cos(tilt), -np.sin(tilt)], [np.sin(tilt), np.cos(tilt)]])
    points = local @ rotation.T + centre
    canvas = np.zeros(shape, np.float32)
    shift = 4
    pts = np.round(points * (1 << shift)).astype(np.int32).reshape(-1, 1, 2)
    cv2.fillPoly(canvas, [pts], 1.0, cv2.LINE_AA, shift)
    return np.clip(canvas, 0.0, 1.0)


def _contrasting_target(work: np.ndarray, coverage: np.ndarray, rng: np.random.Generator,
                        prefer_light: float = 0.5) -> np.ndarray:
    """Lighten or darken strongly, choosing the direction the local surface has room for."""
    region = coverage > _COVERAGE_THRESHOLD
    local_mean = float(work[region].mean()) if region.any() else float(work.mean())
    if local_mean < 70:
        lighten = True
    elif local_mean > 185:
        lighten = False
    else:
        lighten = bool(rng.random() < prefer_light)
    if lighten:
        return work + (255.0 - work) * 0.85
    return work * 0.15


# ----------------------------------------------------------------------------------------------
# Defect painters
# ----------------------------------------------------------------------------------------------

def _scratch(work: np.ndarray, rng: np.random.Generator, severity: float,
             place: _Placement = _random_centre) -> tuple[np.ndarray, np.ndarray, float]:
    """A thin, gently curving line, usually bright (scratches on most surfaces catch the light)."""
    shape = work.shape[:2]
    length = _defect_extent(work, severity) * rng.uniform(1.0, 1.8)
    path = _wandering_path(place(work, rng), length, 24, rng.uniform(0.01, 0.08), rng)
    thickness = _line_px(work) * _lerp(rng.uniform(1.5, 3.0), 1.0, severity)
    coverage = _draw_polyline(shape, path, thickness)
    # Depth varies along the scratch, so it fades in and out rather than being a uniform stroke.
    depth = 0.6 + 0.4 * np.clip(perlin_noise(shape, rng, (2, 2)) + 0.5, 0.0, 1.0)
    coverage = coverage * depth
    return _contrasting_target(work, coverage, rng, prefer_light=0.7), coverage, _strength(severity, rng)


def _crack(work: np.ndarray, rng: np.random.Generator, severity: float,
           place: _Placement = _random_centre) -> tuple[np.ndarray, np.ndarray, float]:
    """A dark jagged fissure, tapering towards its ends, with a few short branches."""
    shape = work.shape[:2]
    length = _defect_extent(work, severity) * rng.uniform(1.0, 1.6)
    n_points = 18
    main = _wandering_path(place(work, rng), length, n_points, 0.45, rng)
    base_width = _line_px(work) * _lerp(rng.uniform(2.0, 3.5), 1.0, severity)
    coverage = np.zeros(shape, np.float32)
    taper = np.sin(np.linspace(0.15, np.pi - 0.15, n_points - 1))
    for i in range(n_points - 1):
        coverage = np.maximum(coverage, _draw_polyline(shape, main[i:i + 2], base_width * taper[i]))
    for _ in range(int(rng.integers(0, 4))):
        start = main[int(rng.integers(3, n_points - 3))]
        branch = _wandering_path(start, length * rng.uniform(0.15, 0.4), 6, 0.5, rng)
        branch = branch - branch[0] + start
        coverage = np.maximum(coverage, _draw_polyline(shape, branch, max(1.0, base_width * 0.5)))
    target = work * 0.1 if float(work.mean()) > 50 else work + (255.0 - work) * 0.7
    return target, coverage, _strength(severity, rng)


def _hole(work: np.ndarray, rng: np.random.Generator, severity: float,
          place: _Placement = _random_centre) -> tuple[np.ndarray, np.ndarray, float]:
    """A puncture: an irregular opening showing the (contrasting) background, with a frayed rim."""
    shape = work.shape[:2]
    channels = work.shape[2]
    radius = max(2.0, _defect_extent(work, severity) * rng.uniform(0.2, 0.4))
    centre = place(work, rng)
    opening = _irregular_blob(shape, centre, radius, rng.uniform(0.1, 0.35), rng)
    rim = cv2.GaussianBlur(opening, (0, 0), max(0.8, radius * 0.25))
    coverage = np.maximum(opening, np.clip(rim * 1.5, 0.0, 1.0))
    local_mean = float(work[opening > 0.5].mean()) if (opening > 0.5).any() else float(work.mean())
    background = rng.uniform(5, 35) if local_mean > 80 else rng.uniform(200, 245)
    hole_colour = _colour((background,) * 3, channels) * rng.uniform(0.9, 1.1, size=channels).astype(np.float32)
    # Inside: background through the hole; on the rim: the surface shadowed by torn material.
    inside = np.clip(opening / np.maximum(coverage, 1e-6), 0.0, 1.0)[..., None]
    target = inside * hole_colour + (1.0 - inside) * (work * 0.45)
    return target, coverage, _strength(severity, rng)


def _stain(work: np.ndarray, rng: np.random.Generator, severity: float,
           place: _Placement = _random_centre) -> tuple[np.ndarray, np.ndarray, float]:
    """Contamination: a soft irregular blot of oil, rust, water or residue, denser in patches."""
    shape = work.shape[:2]
    channels = work.shape[2]
    radius = max(3.0, _defect_extent(work, severity) * rng.uniform(0.3, 0.6))
    centre = place(work, rng)
    blot = _irregular_blob(shape, centre, radius, rng.uniform(0.2, 0.5), rng)
    blot = cv2.GaussianBlur(blot, (0, 0), max(1.0, radius * 0.2))
    density = 0.75 + 0.25 * np.clip(perlin_noise(shape, rng, (4, 4)), -1.0, 1.0)
    coverage = np.clip(blot * 1.3, 0.0, 1.0) * density
    contaminant = rng.choice(["oil", "rust", "water", "residue"])
    if contaminant == "oil":
        target = work * 0.35 + _colour((25, 20, 10), channels) * 0.65
    elif contaminant == "rust":
        target = work * 0.3 + _colour((150, 70, 25), channels) * 0.7
    elif contaminant == "water":
        target = work * 0.55
    else:
        target = work * 0.3 + _colour((235, 232, 220), channels) * 0.7
    # A stain the same colour as the surface would be invisible; push it the other way.
    region = coverage > _COVERAGE_THRESHOLD
    if region.any() and abs(float((target - work)[region].mean())) < 25:
        target = _contrasting_target(work, coverage, rng)
    return target, coverage, _strength(severity, rng)


def _cut(work: np.ndarray, rng: np.random.Generator, severity: float,
         place: _Placement = _random_centre) -> tuple[np.ndarray, np.ndarray, float]:
    """A cut (dark slit with a lit edge) or a fold (displaced band, bright on one side, dark on the other)."""
    if rng.random() < 0.5:
        return _slit(work, rng, severity, place)
    return _fold(work, rng, severity, place)


def _slit(work: np.ndarray, rng: np.random.Generator, severity: float,
          place: _Placement = _random_centre) -> tuple[np.ndarray, np.ndarray, float]:
    shape = work.shape[:2]
    length = _defect_extent(work, severity) * rng.uniform(1.0, 1.8)
    path = _wandering_path(place(work, rng), length, 8, 0.03, rng)
    width = _line_px(work) * _lerp(rng.uniform(2.0, 4.0), 1.0, severity)
    gap = _draw_polyline(shape, path, width)
    direction = path[-1] - path[0]
    normal = np.array([-direction[1], direction[0]]) / (np.linalg.norm(direction) + 1e-6)
    edge = _draw_polyline(shape, path + normal * (width / 2 + _line_px(work)), _line_px(work))
    edge = edge * (1.0 - gap)
    coverage = np.maximum(gap, 0.7 * edge)
    in_gap = (gap / np.maximum(coverage, 1e-6))[..., None]
    target = in_gap * (work * 0.1) + (1.0 - in_gap) * (work + (255.0 - work) * 0.6)
    return target, coverage, _strength(severity, rng)


def _fold(work: np.ndarray, rng: np.random.Generator, severity: float,
          place: _Placement = _random_centre) -> tuple[np.ndarray, np.ndarray, float]:
    height, width = work.shape[:2]
    centre = place(work, rng)
    angle = rng.uniform(0, np.pi)
    along_dir = np.array([np.cos(angle), np.sin(angle)], np.float32)
    normal = np.array([-along_dir[1], along_dir[0]], np.float32)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    dx, dy = xs - centre[0], ys - centre[1]
    across = dx * normal[0] + dy * normal[1]
    along = dx * along_dir[0] + dy * along_dir[1]
    half_width = max(2.0, min(height, width) * _lerp(0.07, 0.025, severity))
    half_length = _defect_extent(work, severity) * rng.uniform(0.8, 1.4)
    u = across / half_width
    band = np.clip(1.0 - np.abs(u), 0.0, 1.0)
    length_fade = np.clip((half_length - np.abs(along)) / (0.3 * half_length), 0.0, 1.0)
    coverage = np.sqrt(band) * length_fade
    # Fabric pushed together: sample from further out so the pattern is compressed in the band,
    # then shade the two flanks of the ridge as lit and in shadow.
    displacement = 0.6 * half_width * np.sign(u) * band
    map_x = (xs + displacement * normal[0]).astype(np.float32)
    map_y = (ys + displacement * normal[1]).astype(np.float32)
    squeezed = cv2.remap(work, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    squeezed = squeezed.reshape(work.shape)
    shading = np.sin(np.pi * np.clip(u, -1.0, 1.0))[..., None]
    target = np.where(shading > 0, squeezed + (255.0 - squeezed) * 0.6 * shading, squeezed * (1.0 + 0.75 * shading))
    return target, coverage, _strength(severity, rng)


def _missing_pattern(work: np.ndarray, rng: np.random.Generator, severity: float,
                     place: _Placement = _random_centre) -> tuple[np.ndarray, np.ndarray, float]:
    """Missing or broken pattern: a patch where the structure is smeared out or misaligned."""
    shape = work.shape[:2]
    height, width = shape
    extent = _defect_extent(work, severity)
    centre = place(work, rng)
    if rng.random() < 0.5:
        # Missing threads/rows: a band along a random direction.
        long_side, short_side = extent * rng.uniform(0.8, 1.5), extent * rng.uniform(0.15, 0.35)
        box = ((float(centre[0]), float(centre[1])), (long_side, max(2.0, short_side)), rng.uniform(0, 180))
        corners = cv2.boxPoints(box)
        region = np.zeros(shape, np.float32)
        cv2.fillPoly(region, [np.round(corners * 16).astype(np.int32)], 1.0, cv2.LINE_AA, 4)
    else:
        region = _irregular_blob(shape, centre, max(3.0, extent * rng.uniform(0.3, 0.5)), 0.25, rng)
    coverage = cv2.GaussianBlur(region, (0, 0), 0.8)
    if rng.random() < 0.5:
        # Pattern gone: only the local colour remains.
        sigma = max(2.0, min(height, width) * 0.03)
        target = cv2.GaussianBlur(work, (0, 0), sigma).reshape(work.shape)
    else:
        # Pattern broken: the surface inside is rotated and rescaled relative to its surroundings.
        matrix = cv2.getRotationMatrix2D((float(centre[0]), float(centre[1])), rng.uniform(25, 155),
                                         rng.uniform(0.7, 1.4))
        target = cv2.warpAffine(work, matrix, (width, height), flags=cv2.INTER_LINEAR,
                                borderMode=cv2.BORDER_REFLECT).reshape(work.shape)
    return target, coverage, _strength(severity, rng)


def _inverted_spot(work: np.ndarray, rng: np.random.Generator, severity: float,
                   place: _Placement = _random_centre) -> tuple[np.ndarray, np.ndarray, float]:
    """The last resort when no kind changes an image: a small disc with its values inverted."""
    height, width = work.shape[:2]
    centre = place(work, rng)
    coverage = np.zeros((height, width), np.float32)
    radius = max(1, int(round(min(height, width) * _lerp(0.12, 0.05, severity))))
    cv2.circle(coverage, (int(centre[0]), int(centre[1])), radius, 1.0, -1)
    return 255.0 - work, coverage, 1.0


_PAINTERS: dict[str, _Painter] = {
    "scratch": _scratch,
    "crack": _crack,
    "hole": _hole,
    "stain": _stain,
    "cut": _cut,
    "missing_pattern": _missing_pattern,
}


# ----------------------------------------------------------------------------------------------
# CutPaste
# ----------------------------------------------------------------------------------------------

def _colour_jitter(patch: np.ndarray, rng: np.random.Generator, amount: float = 0.1) -> np.ndarray:
    """torchvision ColorJitter(brightness, contrast, saturation, hue = amount), on uint8 (h, w, C)."""
    values = patch.astype(np.float32)
    values = values * rng.uniform(1 - amount, 1 + amount)
    grey_mean = values.mean()
    values = grey_mean + (values - grey_mean) * rng.uniform(1 - amount, 1 + amount)
    if patch.shape[2] >= 3:
        rgb = values[..., :3]
        grey = rgb.mean(axis=2, keepdims=True)
        rgb = grey + (rgb - grey) * rng.uniform(1 - amount, 1 + amount)
        hsv = cv2.cvtColor(np.clip(rgb + 0.5, 0, 255).astype(np.uint8), cv2.COLOR_RGB2HSV)
        # OpenCV hue runs 0..179 for a full turn; `amount` is a fraction of a turn.
        hue_shift = int(round(rng.uniform(-amount, amount) * 180))
        hsv[..., 0] = ((hsv[..., 0].astype(np.int32) + hue_shift) % 180).astype(np.uint8)
        values[..., :3] = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB).astype(np.float32)
    return np.clip(values + 0.5, 0, 255).astype(np.uint8)


def _paste_rectangle(work: np.ndarray, out: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> None:
    height, width = work.shape[:2]
    area = rng.uniform(0.02, 0.15) * height * width
    aspect = float(np.exp(rng.uniform(np.log(0.3), np.log(1 / 0.3))))
    patch_h = int(np.clip(round(np.sqrt(area / aspect)), 2, height - 1))
    patch_w = int(np.clip(round(np.sqrt(area * aspect)), 2, width - 1))
    src_y, src_x = int(rng.integers(0, height - patch_h + 1)), int(rng.integers(0, width - patch_w + 1))
    dst_y, dst_x = int(rng.integers(0, height - patch_h + 1)), int(rng.integers(0, width - patch_w + 1))
    patch = _colour_jitter(work[src_y:src_y + patch_h, src_x:src_x + patch_w], rng)
    out[dst_y:dst_y + patch_h, dst_x:dst_x + patch_w] = patch
    mask[dst_y:dst_y + patch_h, dst_x:dst_x + patch_w] = True


def _paste_scar(work: np.ndarray, out: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> None:
    height, width = work.shape[:2]
    unit = min(height, width) / 256.0
    scar_w = int(np.clip(round(rng.uniform(2, 16) * unit), 1, width - 1))
    scar_h = int(np.clip(round(rng.uniform(10, 25) * unit), 3, height - 1))
    src_y, src_x = int(rng.integers(0, height - scar_h + 1)), int(rng.integers(0, width - scar_w + 1))
    patch = _colour_jitter(work[src_y:src_y + scar_h, src_x:src_x + scar_w], rng)
    # Rotate onto a canvas big enough for any angle; the rotated ones-mask says what to paste.
    side = int(np.ceil(np.hypot(scar_h, scar_w))) + 2
    side = min(side, height, width)
    matrix = cv2.getRotationMatrix2D((scar_w / 2.0, scar_h / 2.0), rng.uniform(-45, 45), 1.0)
    matrix[0, 2] += side / 2.0 - scar_w / 2.0
    matrix[1, 2] += side / 2.0 - scar_h / 2.0
    rotated = cv2.warpAffine(patch, matrix, (side, side), flags=cv2.INTER_LINEAR).reshape(side, side, -1)
    inside = cv2.warpAffine(np.ones((scar_h, scar_w), np.uint8), matrix, (side, side),
                            flags=cv2.INTER_NEAREST) > 0
    dst_y, dst_x = int(rng.integers(0, height - side + 1)), int(rng.integers(0, width - side + 1))
    window = out[dst_y:dst_y + side, dst_x:dst_x + side]
    window[inside] = rotated[inside]
    mask[dst_y:dst_y + side, dst_x:dst_x + side] |= inside


# ----------------------------------------------------------------------------------------------
# DRAEM
# ----------------------------------------------------------------------------------------------

def _perlin_mask(height: int, width: int, rng: np.random.Generator, threshold: float = 0.5) -> np.ndarray:
    """Rotated Perlin noise > threshold; redrawn until non-empty, else the top 3% of the last draw."""
    side = int(np.ceil(np.hypot(height, width))) + 2
    noise = None
    for _ in range(8):
        noise = rotate_and_crop(perlin_noise((side, side), rng), rng.uniform(-90, 90), height, width)
        mask = noise > threshold
        if mask.any():
            return mask
    return noise >= np.quantile(noise, 0.97)


def _draem_augment(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Three distinct augmentations from DRAEM's list (imgaug there, numpy/cv2 here)."""
    ops: list[Callable[[np.ndarray, np.random.Generator], np.ndarray]] = [
        _gamma_contrast, _brightness, _sharpen, _hue_saturation, _solarize,
        _posterize, _invert, _autocontrast, _equalize, _rotate,
    ]
    for index in rng.choice(len(ops), size=3, replace=False):
        image = ops[int(index)](image, rng)
    return image


def _gamma_contrast(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    gamma = rng.uniform(0.5, 2.0)
    return (255.0 * (image / 255.0) ** gamma + 0.5).astype(np.uint8)


def _brightness(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.clip(image * rng.uniform(0.8, 1.2) + rng.uniform(-30, 30) + 0.5, 0, 255).astype(np.uint8)


def _sharpen(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    blurred = cv2.GaussianBlur(image, (0, 0), 1.0).reshape(image.shape).astype(np.float32)
    amount = rng.uniform(0.5, 1.5)
    return np.clip(image + amount * (image - blurred) + 0.5, 0, 255).astype(np.uint8)


def _hue_saturation(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    if image.shape[2] < 3:
        return image
    hsv = cv2.cvtColor(np.ascontiguousarray(image[..., :3]), cv2.COLOR_RGB2HSV).astype(np.int32)
    hsv[..., 0] = (hsv[..., 0] + int(rng.integers(-25, 26))) % 180
    hsv[..., 1] = np.clip(hsv[..., 1] + int(rng.integers(-50, 51)), 0, 255)
    out = image.copy()
    out[..., :3] = cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB)
    return out


def _solarize(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    threshold = rng.uniform(32, 128)
    return np.where(image >= threshold, 255 - image, image).astype(np.uint8)


def _posterize(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    bits = int(rng.integers(4, 9))
    keep = np.uint8((0xFF << (8 - bits)) & 0xFF)
    return image & keep


def _invert(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return 255 - image


def _autocontrast(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    low = image.min(axis=(0, 1), keepdims=True).astype(np.float32)
    high = image.max(axis=(0, 1), keepdims=True).astype(np.float32)
    return ((image - low) * (255.0 / np.maximum(high - low, 1.0)) + 0.5).astype(np.uint8)


def _equalize(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    channels = [cv2.equalizeHist(np.ascontiguousarray(image[..., c])) for c in range(image.shape[2])]
    return np.stack(channels, axis=2)


def _rotate(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    height, width = image.shape[:2]
    return rotate(image, rng.uniform(-45, 45), border=cv2.BORDER_REFLECT, centre=(width / 2.0, height / 2.0))
