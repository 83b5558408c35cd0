"""Greedy k-center coreset (PatchCore's memory-bank subsampling), exact and fast on a CPU.

The greedy rule (Sener & Savarese 2018; Roth et al. 2022, Alg. 1): start from one point, then
repeatedly add the point farthest from everything chosen so far. Done naively, each of the K steps
measures the new centre against all N points: O(K * N * d), hours on a CPU for PatchCore's
470,000 patches and 47,000 steps. `greedy_coreset` selects exactly the same points while skipping
almost all of that work with the triangle inequality (a farthest-point traversal with clusters):

- every point p belongs to the cluster of its nearest centre a and keeps mindist(p) = d(p, a);
  each cluster keeps its members sorted by mindist, largest first, and its radius r(a) (the
  first member's mindist); the next centre is the first member of the cluster of largest radius;
- a new centre c can only take members of clusters with d(a, c) < 2 r(a), and within such a
  cluster only the members with mindist(p) > d(a, c) / 2 (else d(p, c) >= d(a, c) - d(p, a) >=
  mindist(p)): a prefix of the sorted list, found by binary search;
- those members are screened once more with the distance over the leading coordinates (a lower
  bound on the full distance), and only the survivors are measured in full;
- d(a, c) itself is screened the same way before it is computed in full.
A member's mindist changes only when it moves to the new centre, so the sorted order survives
every update and only new clusters are sorted. The late steps touch a few hundred points instead
of N. Every skip test carries a small margin, so float rounding never skips a point the naive loop
would update: the selection equals `greedy_coreset_naive` (tests compare them).

The loop runs many small tensor operations, so it runs on one thread (on a busy 2-core machine a
second thread makes each small operation wait for the other core); on CUDA the naive loop is
fast enough and is used instead. As in the paper's implementation, distances are taken on a
Gaussian random projection to `projection_dim` dimensions (Johnson-Lindenstrauss), here rotated
onto principal axes so the leading coordinates bound tightly; the memory bank keeps full features.
"""
from __future__ import annotations

import math

import torch
from tqdm import tqdm

# Skip tests carry a margin of this fraction of the data's extent (its largest distance to the mean),
# well above float32 rounding in the distances, so rounding never skips a point that should change.
_TOLERANCE = 1e-5


def random_projection(features: torch.Tensor, dim: int, seed: int, chunk: int = 65536) -> torch.Tensor:
    """(N, D) -> (N, dim) float32 with a seeded Gaussian matrix scaled by 1/sqrt(dim) (distances preserved on average)."""
    n, d = features.shape
    if dim <= 0 or dim >= d:
        return features.float()
    generator = torch.Generator().manual_seed(seed)
    matrix = torch.randn(d, dim, generator=generator) / math.sqrt(dim)
    out = torch.empty(n, dim, dtype=torch.float32)
    for start in range(0, n, chunk):
        out[start:start + chunk] = features[start:start + chunk].float() @ matrix
    return out


def principal_axes(points: torch.Tensor, sample: int = 65536, seed: int = 0) -> torch.Tensor:
    """Rotate `points` onto their principal axes (an orthogonal map: distances unchanged), largest first."""
    n = points.shape[0]
    generator = torch.Generator().manual_seed(seed)
    subset = points[torch.randperm(n, generator=generator)[:sample]] if n > sample else points
    centred = subset.double() - subset.double().mean(0)
    _, vectors = torch.linalg.eigh(centred.T @ centred)
    rotation = vectors.flip(1).float()  # eigh sorts ascending
    return points @ rotation


def _distances(points: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
    """Euclidean distances of each row to `centre`, computed row by row the same way in both algorithms."""
    return torch.linalg.vector_norm(points - centre, dim=1)


def greedy_coreset_naive(points: torch.Tensor, n_select: int, start: int = 0) -> torch.Tensor:
    """Reference greedy k-center: O(n_select * N * d). For tests, and on CUDA where it is fast."""
    n = points.shape[0]
    n_select = min(n_select, n)
    chosen = torch.empty(n_select, dtype=torch.long)
    mindist = torch.full((n,), math.inf, device=points.device)
    current = start
    for step in range(n_select):
        chosen[step] = current
        torch.minimum(mindist, _distances(points, points[current]), out=mindist)
        current = int(torch.argmax(mindist))
    return chosen


def greedy_coreset(points: torch.Tensor, n_select: int, start: int = 0, bound_dims: int = 16,
                   progress: bool = False) -> torch.Tensor:
    """Indices of the greedy k-center selection of `n_select` rows of `points`, identical to the naive loop.

    Any coordinates give a lower bound on distances; put the high-variance ones first (see
    `coreset_indices`, which rotates to principal axes) so `points[:, :bound_dims]` bounds tightly.
    """
    if points.device.type == "cuda":
        return greedy_coreset_naive(points.float(), n_select, start).cpu()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _greedy_coreset_cpu(points, n_select, start, bound_dims, progress)
    finally:
        torch.set_num_threads(threads)


def _greedy_coreset_cpu(points: torch.Tensor, n_select: int, start: int, bound_dims: int,
                        progress: bool) -> torch.Tensor:
    x = points.float().contiguous()
    n, d = x.shape
    n_select = min(int(n_select), n)
    if n_select <= 0:
        return torch.empty(0, dtype=torch.long)
    low_dims = min(bound_dims, d)
    x_low = x[:, :low_dims].contiguous()
    tol = _TOLERANCE * float(torch.linalg.vector_norm(x - x.mean(0), dim=1).max())

    chosen = torch.empty(n_select, dtype=torch.long)
    centres = torch.empty(n_select, d)  # chosen points, in order
    radius = torch.full((n_select,), -math.inf)  # largest mindist among each centre's points
    mindist = _distances(x, x[start])  # distance of each point to its nearest centre
    # Each cluster's members sorted by mindist, largest first, with the negated distances beside
    # them (ascending, for searchsorted). A member's mindist only changes when it leaves the
    # cluster, so the order survives removals and only a new cluster is ever sorted.
    members: list[torch.Tensor] = [torch.empty(0, dtype=torch.long)] * n_select
    neg_dist: list[torch.Tensor] = [torch.empty(0)] * n_select
    neg_dist[0], members[0] = torch.sort(-mindist)
    chosen[0], centres[0], radius[0] = start, x[start], mindist.max()
    bar = tqdm(total=n_select, desc="coreset (greedy k-center)", unit="step", disable=not progress,
               mininterval=2.0, leave=False)
    bar.update()
    for k in range(1, n_select):
        # the farthest point overall: the first member of the cluster with the largest radius
        parent = int(torch.argmax(radius[:k]))
        position = int(members[parent][0])
        centre = x[position]
        chosen[k], centres[k] = position, centre
        # Clusters the new centre c can reach: d(a, c) < 2 r(a), else no member p (d(p, a) <= r(a))
        # gets closer. Screen with the leading coordinates (a lower bound), confirm in full.
        low = torch.linalg.vector_norm(centres[:k, :low_dims] - centre[:low_dims], dim=1)
        screen = torch.nonzero(low < 2.0 * radius[:k] + tol).view(-1)
        centre_dist = _distances(centres[screen], centre)
        near = centre_dist < 2.0 * radius[screen] + tol
        reach = screen[near].tolist()
        # Within a cluster only members with d(a, c) < 2 mindist(p) can get closer: a prefix of the sorted list.
        cutoffs = (-(centre_dist[near] - tol) / 2.0).tolist()
        prefix = [int(torch.searchsorted(neg_dist[a], cut)) for a, cut in zip(reach, cutoffs)]
        idx = torch.cat([members[a][:m] for a, m in zip(reach, prefix)])
        # the leading coordinates bound d(p, c) from below; confirm the survivors with full rows
        low_dist = torch.linalg.vector_norm(x_low[idx] - centre[:low_dims], dim=1)
        maybe = torch.nonzero(low_dist < mindist[idx] + tol).view(-1)
        cand = idx[maybe]
        new = _distances(x[cand], centre)
        closer = new < mindist[cand]
        moved_at = maybe[closer]  # positions in idx of the points that move to the new centre
        moved, moved_dist = cand[closer], new[closer]
        mindist[moved] = moved_dist
        order = torch.argsort(moved_dist, descending=True)
        members[k], neg_dist[k] = moved[order], -moved_dist[order]
        radius[k] = moved_dist[order[0]] if moved.numel() else -math.inf
        # the clusters that lost members keep the rest, in order
        if moved_at.numel():
            bounds = torch.tensor(prefix).cumsum(0)
            losers = torch.unique(torch.searchsorted(bounds, moved_at, right=True)).tolist()
            stay = torch.ones(idx.numel(), dtype=torch.bool)
            stay[moved_at] = False
            offsets = [0] + bounds.tolist()
            for j in losers:
                a, lo, hi = reach[j], offsets[j], offsets[j + 1]
                keep = stay[lo:hi]
                m = prefix[j]
                members[a] = torch.cat([members[a][:m][keep], members[a][m:]])
                neg_dist[a] = torch.cat([neg_dist[a][:m][keep], neg_dist[a][m:]])
                radius[a] = -neg_dist[a][0] if members[a].numel() else -math.inf
        bar.update()
    bar.close()
    return chosen


def coreset_indices(features: torch.Tensor, ratio: float, projection_dim: int = 128, seed: int = 0,
                    progress: bool = False, device: torch.device | str = "cpu") -> torch.Tensor:
    """PatchCore's subsampling: greedy k-center on a random projection, `ratio` of the rows (at least 1)."""
    n = features.shape[0]
    if ratio >= 1.0:
        return torch.arange(n)
    n_select = max(1, int(round(n * ratio)))
    projected = principal_axes(random_projection(features, projection_dim, seed))
    start = int(torch.randint(n, (1,), generator=torch.Generator().manual_seed(seed)))
    return greedy_coreset(projected.to(device), n_select, start=start, progress=progress)
