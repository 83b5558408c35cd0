"""Realistic positives from the training fold's own images: transplanted real defects and natural synthetic anomalies.

`transplant` cuts a real defect out through its mask (with a margin of surface around it), moves and
transforms it, and Poisson-blends it (Pérez, Gangnet, Blake, "Poisson Image Editing", SIGGRAPH 2003)
into a normal image; `nsa` follows NSA (Schlüter, Tan, Hou, Kainz, "Natural Synthetic Anomalies for
Self-Supervised Anomaly Detection and Localization", ECCV 2022): patches of other normal images,
rescaled and shifted, Poisson-blended in. Both read only the `DefectBank` and `NormalPool` a caller
hands them, so a caller that builds those from the training fold alone cannot leak a validation image.
Images follow the painters' contract: uint8 (H, W) or (H, W, C) in, a new image plus a 0/255 mask out;
when nothing visible can be made, a painted defect stands in (`painters.substitution_counts`).

The Poisson equation is solved here, exactly (DST for rectangles, sparse LU otherwise), rather than
by `cv2.seamlessClone`: OpenCV erodes its mask, flattening content within ~3 px of the mask's edge
(a small defect with a small margin vanishes), and leaves ramps and ringing on small regions.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import cv2
import numpy as np

from competition.data.painters import _as_uint8_hwc, _mask_to_uint8, _match_channels, _restore_layout, _substitute

# --- transplant
MARGIN_SHARE = 0.25  # surface cut around a defect: this share of its larger side ...
MIN_MARGIN_PX = 3  # ... and never less
JOIN_PX = 2  # mask parts this close are one defect; farther ones are cut (and moved) separately
MAX_ANGLE = 15.0  # small rotation (degrees) on top of the flips and quarter turns
SCALE_RANGE = (0.75, 1.33)  # size change (log-uniform), after matching the images' short sides
CONTRAST = (1.15, 0.6)  # defect contrast against its surroundings at severity 0 (obvious) and 1 (subtle)
PLACEMENT_CANDIDATES = 8  # positions compared; the one whose surface looks most like the defect's own wins
# Drawn uniformly per defect. Poisson alone turns a crisp defect on a binary surface (a circuit board)
# into a grey smear wherever the surroundings differ; alpha keeps its pixels as they were.
TRANSPLANT_BLENDS = ("normal", "mixed", "alpha")
# --- NSA
NSA_SIDE_RANGE = (0.1, 0.4)  # patch side as a share of the image side (the paper's default half-widths 0.05-0.2)
NSA_RESIZE = (0.7, 1.3)  # patch rescaling: normal(1, 0.5) clipped to this range, as in the paper
NSA_MAX_PATCHES = 3  # the first patch always, each further one with probability 1/2
NSA_TOLERANCE = 3.0  # mean absolute change (grey levels, over channels) for a pixel to count as anomalous
NSA_BLENDS = ("normal", "mixed")  # the paper's Poisson variants
# --- both
ATTEMPTS = 5  # whole draws before another kind stands in
BORDER_PX = 1  # Poisson needs the target's values around its region; a region at the border is feathered
MIN_POISSON_SIDE = 8  # images smaller than this are feathered, not Poisson-blended
_NEIGHBOURS = ((0, 1), (0, -1), (1, 0), (-1, 0))


# ----------------------------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DefectPiece:
    """One real defect cut out with its margin: `defect` marks the defect itself, `region` the blended area."""
    image: np.ndarray  # (h, w, 3) uint8
    defect: np.ndarray  # (h, w) bool, the source mask
    region: np.ndarray  # (h, w) bool, the defect dilated by the margin
    source_id: str
    source_short_side: int  # of the whole source image: sizes transfer relative to the image


class DefectBank:
    """The real defects `transplant` may cut from; build it from the training fold's defects only.

    `from_pairs` takes (id, image, mask) and keeps the defects whose mask marks some pixel; the
    others (no mask, empty mask) are counted in `skipped`, so image labels alone never enter.
    """

    def __init__(self, pieces: list[DefectPiece], skipped: int = 0):
        self.pieces = list(pieces)
        self.skipped = skipped

    @classmethod
    def from_pairs(cls, pairs: Iterable[tuple[str, np.ndarray, np.ndarray | None]],
                   margin: int | None = None) -> DefectBank:
        pieces, skipped = [], 0
        for source_id, image, mask in pairs:
            cut = [] if mask is None else cut_pieces(str(source_id), image, mask, margin)
            skipped += not cut
            pieces += cut
        return cls(pieces, skipped)

    @property
    def source_ids(self) -> list[str]:
        """The image each piece was cut from (an image with several separate defects gives several pieces)."""
        return [piece.source_id for piece in self.pieces]

    def __len__(self) -> int:
        return len(self.pieces)

    def __repr__(self) -> str:
        return f"DefectBank({len(self)} defects, {self.skipped} images without a mask)"


def cut_pieces(source_id: str, image: np.ndarray, mask: np.ndarray, margin: int | None = None) -> list[DefectPiece]:
    """One piece per separate defect of `mask` (any nonzero pixel; parts `JOIN_PX` apart or nearer are one
    defect), each with `margin` px of surface around it (None: `MARGIN_SHARE` of its size); [] for an
    empty mask. A neighbour's pixels inside a piece's margin count as defect there too."""
    work = _as_uint8_hwc(image)
    defect = np.asarray(mask)
    defect = (defect if defect.ndim == 2 else defect[..., 0]) > 0
    if defect.shape != work.shape[:2]:
        raise ValueError(f"defect {source_id}: mask is {defect.shape[0]}x{defect.shape[1]} (height x width) but "
                         f"its image is {work.shape[0]}x{work.shape[1]}")
    joined = cv2.dilate(defect.astype(np.uint8), np.ones((2 * JOIN_PX + 1,) * 2, np.uint8))
    count, labels, boxes, _ = cv2.connectedComponentsWithStats(joined, connectivity=8)
    pieces = []
    for label in range(1, count):
        part = (labels == label) & defect
        if not part.any():
            continue
        ys, xs = np.nonzero(part)
        top, bottom, left, right = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        pad = margin if margin is not None else max(MIN_MARGIN_PX, int(round(MARGIN_SHARE * max(bottom - top,
                                                                                                 right - left))))
        top, left = max(0, top - pad), max(0, left - pad)
        bottom, right = min(work.shape[0], bottom + pad), min(work.shape[1], right + pad)
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * pad + 1, 2 * pad + 1))
        region = cv2.dilate(part[top:bottom, left:right].astype(np.uint8), kernel) > 0
        crop = _match_channels(np.ascontiguousarray(work[top:bottom, left:right]), 3)
        pieces.append(DefectPiece(crop, defect[top:bottom, left:right] & region, region, source_id,
                                  int(min(work.shape[:2]))))
    return pieces


@dataclass
class NormalPool:
    """Normal images `nsa` may cut patches from: their ids and `read(id)` (the caller's loader)."""
    ids: list[str]
    read: Callable[[str], np.ndarray]

    def __len__(self) -> int:
        return len(self.ids)


# ----------------------------------------------------------------------------------------------
# Transplant
# ----------------------------------------------------------------------------------------------

def transplant(image: np.ndarray, rng: np.random.Generator, bank: DefectBank | None,
               severity: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A real defect of `bank` moved into a copy of `image`; returns (new image, 0/255 mask of the moved defect).

    The piece is flipped, turned by quarter turns and up to `MAX_ANGLE` degrees, rescaled (source and
    target short sides matched, then `SCALE_RANGE`), its contrast against its own surroundings set by
    `severity` (0 obvious .. 1 subtle; None draws it), and placed where the target's surface is
    most like the defect's own margin (mean and spread, best of `PLACEMENT_CANDIDATES`). Blending is
    Poisson (normal or mixed gradients) or a feathered alpha after matching the margin's mean, a third
    each, inside the margin; alpha also where the region touches the image border or the image is tiny.
    Pixels outside the margin are unchanged; the mask is the defect's own mask, moved.
    An empty bank, or a piece that changes nothing, lets a painted kind stand in.
    """
    work = _as_uint8_hwc(image)
    severity = float(rng.uniform(0.0, 1.0)) if severity is None else float(severity)
    if bank is not None and len(bank):
        for _ in range(ATTEMPTS):
            piece = bank.pieces[int(rng.integers(len(bank)))]
            patch, defect, region = _transform_piece(piece, work.shape[:2], rng, severity)
            patch = _match_channels(patch, work.shape[2])
            top, left = _plausible_position(work, patch, defect, region, rng)
            out = _blend(work, patch, region, defect, top, left, rng, TRANSPLANT_BLENDS)
            mask = np.zeros(work.shape[:2], bool)
            mask[top:top + patch.shape[0], left:left + patch.shape[1]] = defect
            if np.any(out[mask] != work[mask]):
                return _restore_layout(out, image), _mask_to_uint8(mask)
    return _substitute(image, work.astype(np.float32), "transplant", rng, severity)


def _transform_piece(piece: DefectPiece, target_shape: tuple[int, int], rng: np.random.Generator,
                     severity: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(patch, defect, region) flipped, turned, rescaled, contrast-set, cropped to the region, fitting the target."""
    patch, defect, region = piece.image, piece.defect, piece.region
    if rng.random() < 0.5:
        patch, defect, region = patch[:, ::-1], defect[:, ::-1], region[:, ::-1]
    if rng.random() < 0.5:
        patch, defect, region = patch[::-1], defect[::-1], region[::-1]
    turns = int(rng.integers(4))
    patch, defect, region = (np.ascontiguousarray(np.rot90(a, turns)) for a in (patch, defect, region))
    angle = float(rng.uniform(-MAX_ANGLE, MAX_ANGLE))
    scale = min(target_shape) / piece.source_short_side * float(np.exp(rng.uniform(*np.log(SCALE_RANGE))))
    patch, defect, region = _rotate_and_scale(patch, defect, region, angle, scale)
    patch, defect, region = _fit_inside(patch, defect, region, target_shape)

    ring = region & ~defect
    values = patch.astype(np.float32)
    reference = values[ring].mean(axis=0) if ring.any() else values.reshape(-1, values.shape[2]).mean(axis=0)
    contrast = (CONTRAST[0] + (CONTRAST[1] - CONTRAST[0]) * severity) * float(rng.uniform(0.9, 1.1))
    patch = np.clip(reference + (values - reference) * contrast + 0.5, 0, 255).astype(np.uint8)
    return patch, defect, region


def _rotate_and_scale(patch: np.ndarray, defect: np.ndarray, region: np.ndarray, angle: float,
                      scale: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Warp onto a canvas holding the whole turned rectangle, then crop to the warped region."""
    height, width = defect.shape
    matrix = cv2.getRotationMatrix2D((width / 2.0, height / 2.0), angle, scale)
    corners = np.array([[0, 0, 1], [width, 0, 1], [0, height, 1], [width, height, 1]], np.float64) @ matrix.T
    matrix[:, 2] -= corners.min(axis=0)
    size = np.ceil(corners.max(axis=0) - corners.min(axis=0)).astype(int)
    size = (max(1, int(size[0])), max(1, int(size[1])))
    # Replicated borders: interpolation at the rectangle's edge must not pull in black.
    patch = cv2.warpAffine(patch, matrix, size, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    patch = patch.reshape(size[1], size[0], -1)

    def warp_mask(mask: np.ndarray) -> np.ndarray:
        return cv2.warpAffine(mask.astype(np.float32), matrix, size, flags=cv2.INTER_LINEAR)

    defect_cover, region_cover = warp_mask(defect), warp_mask(region)
    warped_defect = defect_cover >= 0.5
    if not warped_defect.any():  # a one-pixel defect shrunk below half a pixel: keep its strongest pixel
        warped_defect = defect_cover >= defect_cover.max()
    warped_region = (region_cover >= 0.5) | warped_defect
    ys, xs = np.nonzero(warped_region)
    box = (slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1))
    return np.ascontiguousarray(patch[box]), warped_defect[box], warped_region[box]


def _fit_inside(patch: np.ndarray, defect: np.ndarray, region: np.ndarray,
                target_shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Shrink a piece larger than the target (keeping the Poisson border free where the target allows)."""
    height, width = target_shape
    room_y = height - 2 * BORDER_PX if height > 2 * BORDER_PX + 2 else height
    room_x = width - 2 * BORDER_PX if width > 2 * BORDER_PX + 2 else width
    shrink = min(1.0, room_y / defect.shape[0], room_x / defect.shape[1])
    if shrink >= 1.0:
        return patch, defect, region
    size = (max(1, int(defect.shape[1] * shrink)), max(1, int(defect.shape[0] * shrink)))
    patch = cv2.resize(patch, size, interpolation=cv2.INTER_AREA).reshape(size[1], size[0], -1)
    new_defect = cv2.resize(defect.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST) > 0
    if not new_defect.any():
        cover = cv2.resize(defect.astype(np.float32), size, interpolation=cv2.INTER_AREA)
        new_defect = cover >= cover.max()
    new_region = (cv2.resize(region.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST) > 0) | new_defect
    return patch, new_defect, new_region


def _plausible_position(work: np.ndarray, patch: np.ndarray, defect: np.ndarray, region: np.ndarray,
                        rng: np.random.Generator) -> tuple[int, int]:
    """(top, left) among `PLACEMENT_CANDIDATES` draws whose surface under the margin best matches the patch's."""
    height, width = work.shape[:2]
    patch_h, patch_w = defect.shape
    border = BORDER_PX if height - patch_h >= 2 * BORDER_PX and width - patch_w >= 2 * BORDER_PX else 0
    ring = region & ~defect
    ring = ring if ring.any() else region
    grey_patch = patch.astype(np.float32).mean(axis=2)[ring]
    wanted = (grey_patch.mean(), grey_patch.std())
    best, best_cost = (border, border), np.inf
    for _ in range(PLACEMENT_CANDIDATES):
        top = int(rng.integers(border, height - patch_h - border + 1))
        left = int(rng.integers(border, width - patch_w - border + 1))
        under = work[top:top + patch_h, left:left + patch_w].astype(np.float32).mean(axis=2)[ring]
        cost = abs(under.mean() - wanted[0]) + abs(under.std() - wanted[1])
        if cost < best_cost:
            best, best_cost = (top, left), cost
    return best


# ----------------------------------------------------------------------------------------------
# Blending
# ----------------------------------------------------------------------------------------------

def _blend(work: np.ndarray, patch: np.ndarray, region: np.ndarray, core: np.ndarray, top: int, left: int,
           rng: np.random.Generator, blends: tuple[str, ...]) -> np.ndarray:
    """`patch` blended into a copy of `work` at (top, left) inside `region`; pixels outside it unchanged.

    One of `blends`, drawn uniformly: "normal" or "mixed" Poisson (the patch's gradients, or per pixel
    the stronger of the patch's and the target's), "alpha" (1 on `core`, falling to 0 at the region's
    edge). Poisson needs `BORDER_PX` between the region and the image border; nearer, alpha stands in.
    """
    height, width = work.shape[:2]
    patch_h, patch_w = region.shape
    blend = blends[int(rng.integers(len(blends)))]
    if blend != "alpha" and (min(height, width) >= MIN_POISSON_SIDE and top >= BORDER_PX and left >= BORDER_PX
                             and top + patch_h <= height - BORDER_PX and left + patch_w <= width - BORDER_PX):
        return _poisson(work, patch, region, top, left, mixed=blend == "mixed")
    return _feather(work, patch, region, core, top, left)


def _poisson(work: np.ndarray, patch: np.ndarray, region: np.ndarray, top: int, left: int,
             mixed: bool) -> np.ndarray:
    """Pérez et al.'s guided interpolation: inside `region` the values whose 4-neighbour differences best
    match the patch's (or, `mixed`, per channel the larger of the patch's and the target's), equal to
    the target on the region's outer boundary. The region keeps 1 px off the image border."""
    patch_h, patch_w = region.shape
    target = work.astype(np.float64)
    source = target.copy()
    # The patch's edge replicated one pixel out: no gradient between the patch and the target's own
    # pixels, which would paste the patch's colour back in at the rectangle's edge.
    padded = cv2.copyMakeBorder(patch, 1, 1, 1, 1, cv2.BORDER_REPLICATE).reshape(patch_h + 2, patch_w + 2, -1)
    source[top - 1:top + patch_h + 1, left - 1:left + patch_w + 1] = padded
    inside = np.zeros(work.shape[:2], bool)
    inside[top:top + patch_h, left:left + patch_w] = region
    ys, xs = np.nonzero(inside)
    index = np.full(inside.shape, -1, np.int64)
    index[ys, xs] = np.arange(len(ys))
    rhs = np.zeros((len(ys), work.shape[2]))
    links_from, links_to = [], []
    for dy, dx in _NEIGHBOURS:
        ny, nx = ys + dy, xs + dx
        guide = source[ys, xs] - source[ny, nx]
        if mixed:
            own = target[ys, xs] - target[ny, nx]
            guide = np.where(np.abs(own) > np.abs(guide), own, guide)
        rhs += guide
        neighbour = index[ny, nx]
        boundary = neighbour < 0
        rhs[boundary] += target[ny[boundary], nx[boundary]]
        links_from.append(np.flatnonzero(~boundary))
        links_to.append(neighbour[~boundary])
    if region.all():
        # A rectangle: the 5-point Dirichlet Laplacian is diagonal in the type-I sine basis.
        from scipy.fft import dstn, idstn

        rows = np.cos(np.pi * np.arange(1, patch_h + 1) / (patch_h + 1))
        cols = np.cos(np.pi * np.arange(1, patch_w + 1) / (patch_w + 1))
        eigen = (4.0 - 2.0 * rows[:, None] - 2.0 * cols[None, :])[..., None]
        spectrum = dstn(rhs.reshape(patch_h, patch_w, -1), type=1, axes=(0, 1), norm="ortho")
        values = idstn(spectrum / eigen, type=1, axes=(0, 1), norm="ortho").reshape(len(ys), -1)
    else:
        from scipy.sparse import csc_matrix, identity
        from scipy.sparse.linalg import spsolve

        links_from, links_to = np.concatenate(links_from), np.concatenate(links_to)
        adjacency = csc_matrix((np.ones(len(links_from)), (links_from, links_to)), shape=(len(ys), len(ys)))
        values = spsolve((4.0 * identity(len(ys), format="csc") - adjacency).tocsc(), rhs)
        values = values.reshape(len(ys), -1)
    out = work.copy()
    out[ys, xs] = np.clip(values + 0.5, 0, 255).astype(np.uint8)
    return out


def _feather(work: np.ndarray, patch: np.ndarray, region: np.ndarray, core: np.ndarray, top: int,
             left: int) -> np.ndarray:
    """Alpha blend: 1 on `core`, falling linearly to 0 at the region's edge; the patch's margin mean matched."""
    patch_h, patch_w = region.shape
    window = work[top:top + patch_h, left:left + patch_w].astype(np.float32)
    values = patch.astype(np.float32)
    ring = region & ~core
    if ring.any():
        values = values + (window[ring].mean(axis=0) - values[ring].mean(axis=0))
    distance = cv2.distanceTransform((~core).astype(np.uint8), cv2.DIST_L2, 3)
    reach = float(distance[region].max()) + 1.0
    alpha = (np.clip(1.0 - distance / reach, 0.0, 1.0) * region)[..., None]
    out = work.copy()
    blended = window * (1.0 - alpha) + values * alpha
    out[top:top + patch_h, left:left + patch_w] = np.clip(blended + 0.5, 0, 255).astype(np.uint8)
    return out


# ----------------------------------------------------------------------------------------------
# NSA
# ----------------------------------------------------------------------------------------------

def nsa(image: np.ndarray, rng: np.random.Generator, pool: NormalPool | None,
        exclude: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Natural synthetic anomaly: patches of other normals of `pool` Poisson-blended into a copy of `image`.

    Per patch (the first always, up to `NSA_MAX_PATCHES` with probability 1/2 each): a source other
    than `exclude` (the target's own id), sides drawn from `NSA_SIDE_RANGE` of the target's,
    rescaled by normal(1, 0.5) clipped to `NSA_RESIZE`, cut at a random place of the source and
    blended at a random place of the target (normal or mixed gradients, half each). The mask is
    where the blend changed the mean over channels by more than `NSA_TOLERANCE` grey levels, median-
    filtered (5 px) as in the paper; pixels outside it are reset, so the mask is exactly what changed.

    Deviations from the paper: binary masks only (no intensity-logistic labels), no object-foreground
    masks or per-class settings, one tolerance for every dataset, an exact Poisson solve (the
    authors' code calls cv2.seamlessClone), source patches sized relative to the target (their
    content rescaled with the images' short sides), feathered alpha where a patch touches the image
    border, and a painted defect stands in where no patch changes anything.
    """
    work = _as_uint8_hwc(image)
    height, width, channels = work.shape
    sources = [] if pool is None else [source_id for source_id in pool.ids if source_id != exclude]
    if sources and min(height, width) >= 4:
        for _ in range(ATTEMPTS):
            out = work.copy()
            for patch_index in range(NSA_MAX_PATCHES):
                if patch_index > 0 and rng.random() >= 0.5:
                    break
                source_id = sources[int(rng.integers(len(sources)))]
                source = _match_channels(_as_uint8_hwc(np.asarray(pool.read(source_id))), channels)
                out = _nsa_patch(out, source, rng)
            change = np.abs(out.astype(np.float32) - work.astype(np.float32)).mean(axis=2) > NSA_TOLERANCE
            mask = cv2.medianBlur(change.astype(np.uint8) * 255, 5) > 0
            out = np.where(mask[..., None], out, work)
            if mask.any() and np.any(out[mask] != work[mask]):
                return _restore_layout(out, image), _mask_to_uint8(mask)
    return _substitute(image, work.astype(np.float32), "nsa", rng, float(rng.uniform(0.0, 1.0)))


def _nsa_patch(work: np.ndarray, source: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One NSA patch of `source` blended into a copy of `work` at a random place."""
    height, width = work.shape[:2]
    patch_h = max(2, int(round(rng.uniform(*NSA_SIDE_RANGE) * height)))
    patch_w = max(2, int(round(rng.uniform(*NSA_SIDE_RANGE) * width)))
    resize = float(np.clip(rng.normal(1.0, 0.5), *NSA_RESIZE))
    # The source area that, rescaled, fills the patch; sizes follow the images' short sides.
    relative = min(source.shape[:2]) / min(height, width)
    cut_h = int(np.clip(round(patch_h / resize * relative), 1, source.shape[0]))
    cut_w = int(np.clip(round(patch_w / resize * relative), 1, source.shape[1]))
    src_top = int(rng.integers(0, source.shape[0] - cut_h + 1))
    src_left = int(rng.integers(0, source.shape[1] - cut_w + 1))
    patch_h, patch_w = min(patch_h, height), min(patch_w, width)
    patch = cv2.resize(source[src_top:src_top + cut_h, src_left:src_left + cut_w], (patch_w, patch_h),
                       interpolation=cv2.INTER_LINEAR).reshape(patch_h, patch_w, -1)
    border = BORDER_PX if height - patch_h >= 2 * BORDER_PX and width - patch_w >= 2 * BORDER_PX else 0
    top = int(rng.integers(border, height - patch_h - border + 1))
    left = int(rng.integers(border, width - patch_w - border + 1))
    region = np.ones((patch_h, patch_w), bool)
    # Feathered only where Poisson cannot run: full strength on the inner half, fading to the edge.
    core = np.zeros_like(region)
    core[patch_h // 4:patch_h - patch_h // 4, patch_w // 4:patch_w - patch_w // 4] = True
    core[patch_h // 2, patch_w // 2] = True
    return _blend(work, patch, region, core, top, left, rng, NSA_BLENDS)


__all__ = ["DefectBank", "DefectPiece", "NormalPool", "cut_pieces", "nsa", "transplant"]
