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
every update and only new clusters are sorted. On real patch features (low intrinsic dimension at
the coreset's scale) the late steps touch a few hundred points instead of N. On structureless data
(i.i.d. noise, where every point is about equally far from every other) nothing can be skipped:
the loop then notices that its pruned steps cost more than dense ones and falls back to dense
steps (the naive update), so it is never much slower than the naive loop. Every skip test carries
a small margin, so float rounding never skips a point the naive loop would update: the selection
equals `greedy_coreset_naive` whichever kind of step ran (tests compare them).

The loop runs many small tensor operations, so it runs on one thread (on a busy 2-core machine a
second thread makes each small operation wait for the other core); on CUDA the naive loop is
fast enough and is used instead. As in the paper's implementation, distances are taken on a
Gaussian random projection to `projection_dim` dimensions (Johnson-Lindenstrauss), here rotated
onto principal axes so the leading coordinates bound tightly; the memory bank keeps full features.
"""
from __future__ import annotations

import math
import time

import torch
from tqdm import tqdm

# Skip tests carry a margin of this fraction of the data's extent (its largest distance to the mean),
# well above float32 rounding in the distances, so rounding never skips a point that should change.
_TOLERANCE = 1e-5
_SECONDS_PER_CLUSTER = 2e-5  # rough cost of visiting one cluster in a pruned step (Python + small ops)


def random_projection(features: torch.Tensor, dim: int, seed: int, chunk: int = 65536) -> torch.Tensor:
    """(N, D) -> (N, dim) float32 with a seeded Gaussian matrix scaled by 1/sqrt(dim) (distances kept on average)."""
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
                   progress: bool = False, _switch_every: int | None = None) -> torch.Tensor:
    """Indices of the greedy k-center selection of `n_select` rows of `points`, identical to the naive loop.

    Any coordinates give a lower bound on distances; put the high-variance ones first (see
    `coreset_indices`, which rotates to principal axes) so `points[:, :bound_dims]` bounds tightly.
    `_switch_every` (tests only) alternates dense and pruned steps at that period instead of by timing.
    """
    if points.device.type == "cuda":
        return greedy_coreset_naive(points.float(), n_select, start).cpu()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _FarthestPointTraversal(points, start, n_select, bound_dims).run(progress, _switch_every)
    finally:
        torch.set_num_threads(threads)


class _FarthestPointTraversal:
    """State of the greedy selection; steps are dense (every point) or pruned (see the module doc).

    Pruning pays off when the data have low intrinsic dimension at the coreset's scale (real patch
    features: ~20x fewer operations); on structureless data (i.i.d. noise) every cluster is within
    reach and a pruned step costs more than a dense one. `run` times both kinds and falls back to
    dense steps for a while (doubling each time) when pruned steps are slower; both kinds keep the
    same state, so the selection is the same whichever runs.
    """

    def __init__(self, points: torch.Tensor, start: int, n_select: int, bound_dims: int):
        self.x = x = points.float().contiguous()
        n, d = x.shape
        self.n_select = min(int(n_select), n)
        self.low_dims = min(bound_dims, d)
        self.x_low = x[:, :self.low_dims].contiguous()
        self.tol = _TOLERANCE * float(torch.linalg.vector_norm(x - x.mean(0), dim=1).max()) if n else 0.0
        self.chosen = torch.empty(self.n_select, dtype=torch.long)
        self.centres = torch.empty(self.n_select, d)  # chosen points, in order
        self.radius = torch.full((self.n_select,), -math.inf)  # largest mindist among each centre's points
        self.mindist = torch.full((n,), math.inf)  # distance of each point to its nearest centre
        self.assign = torch.zeros(n, dtype=torch.long)  # which centre that is
        # Each cluster's members sorted by mindist, largest first, with the negated distances beside
        # them (ascending, for searchsorted); valid while `clustered`. A member's mindist only
        # changes when it leaves the cluster, so the order survives removals.
        self.members: list[torch.Tensor] = []
        self.neg_dist: list[torch.Tensor] = []
        self.sizes = torch.zeros(self.n_select, dtype=torch.long)  # members per cluster
        self.clustered = False
        self.k = 0
        self.stats = {"dense": 0, "pruned": 0, "gave_up": 0, "rebuilds": 0}  # steps of each kind
        self.next_position = int(start)

    def run(self, progress: bool, switch_every: int | None) -> torch.Tensor:
        bar = tqdm(total=self.n_select, desc="coreset (greedy k-center)", unit="step", disable=not progress,
                   mininterval=2.0, leave=False)
        dense_time = pruned_time = None
        in_mode, dense_left = 0, 1
        while self.k < self.n_select:
            began = time.process_time()
            if dense_left > 0:
                self.dense_step()
                spent = time.process_time() - began
                dense_time = spent if dense_time is None else 0.9 * dense_time + 0.1 * spent
                dense_left -= 1
                if dense_left == 0:
                    self.build_clusters()
                    pruned_time, in_mode = None, 0
            else:
                # a step reaching more clusters than a dense step could visit in its time, or more than a
                # half of the points, is done densely
                reach_limit = None if switch_every else max(64, int(dense_time / _SECONDS_PER_CLUSTER))
                pruned = self.pruned_step(reach_limit)
                spent = time.process_time() - began
                pruned_time = spent if pruned_time is None else 0.9 * pruned_time + 0.1 * spent
                in_mode += 1
                slower = not pruned or (in_mode >= 32 and pruned_time > 1.5 * dense_time)
                if (switch_every and in_mode >= switch_every) or (not switch_every and slower):
                    # dense for a while (half the steps so far: rebuilding the clusters costs about two
                    # dense steps), then try pruning again: it pays off once the clusters are small
                    dense_left = switch_every or max(16, self.k // 2)
                    self.clustered = False
            bar.update()
        bar.close()
        return self.chosen

    def _add_centre(self) -> tuple[int, torch.Tensor]:
        k, position = self.k, self.next_position
        centre = self.x[position]
        self.chosen[k], self.centres[k] = position, centre
        return k, centre

    def _choose_next(self) -> None:
        self.k += 1
        if self.k >= self.n_select:
            return
        if self.clustered:  # the first member of the cluster with the largest radius
            self.next_position = int(self.members[int(torch.argmax(self.radius[:self.k]))][0])
        else:
            self.next_position = int(torch.argmax(self.mindist))

    def dense_step(self) -> None:
        self.stats["dense"] += 1
        k, centre = self._add_centre()
        self._dense_update(k, centre)
        self._choose_next()

    def _dense_update(self, k: int, centre: torch.Tensor, chunk: int = 32768) -> None:
        for s in range(0, self.x.shape[0], chunk):
            new = _distances(self.x[s:s + chunk], centre)
            closer = torch.nonzero(new < self.mindist[s:s + chunk]).view(-1)
            self.mindist[s + closer] = new[closer]
            self.assign[s + closer] = k

    def build_clusters(self) -> None:
        self.stats["rebuilds"] += 1
        k = self.k
        order = torch.argsort(self.mindist, descending=True, stable=True)
        order = order[torch.argsort(self.assign[order], stable=True)]
        counts = torch.bincount(self.assign, minlength=k).tolist()
        self.members = list(torch.split(order, counts)) + [torch.empty(0, dtype=torch.long)] * (self.n_select - k)
        self.neg_dist = list(torch.split(-self.mindist[order], counts)) + [torch.empty(0)] * (self.n_select - k)
        self.radius[:k] = torch.full((k,), -math.inf).scatter_reduce_(0, self.assign, self.mindist, "amax")
        self.sizes[:k] = torch.tensor(counts)
        self.clustered = True
        if k < self.n_select:
            self.next_position = int(self.members[int(torch.argmax(self.radius[:k]))][0])

    def pruned_step(self, reach_limit: int | None = None) -> bool:
        """One step through the clusters; False if more than `reach_limit` were in reach and it went dense."""
        k, centre = self._add_centre()
        self.stats["pruned"] += 1
        x, x_low, mindist, radius = self.x, self.x_low, self.mindist, self.radius
        tol, low_dims = self.tol, self.low_dims
        members, neg_dist = self.members, self.neg_dist
        # Clusters the new centre c can reach: d(a, c) < 2 r(a), else no member p (d(p, a) <= r(a))
        # gets closer. Screen with the leading coordinates (a lower bound), confirm in full.
        low = torch.linalg.vector_norm(self.centres[:k, :low_dims] - centre[:low_dims], dim=1)
        screen = torch.nonzero(low < 2.0 * radius[:k] + tol).view(-1)
        centre_dist = _distances(self.centres[screen], centre)
        near = centre_dist < 2.0 * radius[screen] + tol
        reach_t = screen[near]
        reach = reach_t.tolist()
        too_many = len(reach) > reach_limit or int(self.sizes[reach_t].sum()) > self.x.shape[0] // 2 \
            if reach_limit is not None else False
        if too_many:
            self.stats["gave_up"] += 1
            self._dense_update(k, centre)
            self.clustered = False
            self._choose_next()
            return False
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
        self.assign[moved] = k
        order = torch.argsort(moved_dist, descending=True)
        members[k], neg_dist[k] = moved[order], -moved_dist[order]
        radius[k] = moved_dist[order[0]] if moved.numel() else -math.inf
        self.sizes[k] = moved.numel()
        # the clusters that lost members keep the rest, in order
        if moved_at.numel():
            bounds = torch.tensor(prefix).cumsum(0)
            losers = torch.unique(torch.searchsorted(bounds, moved_at, right=True)).tolist()
            stay = torch.ones(idx.numel(), dtype=torch.bool)
            stay[moved_at] = False
            offsets = [0] + bounds.tolist()
            for j in losers:
                a, lo, hi, m = reach[j], offsets[j], offsets[j + 1], prefix[j]
                keep = stay[lo:hi]
                members[a] = torch.cat([members[a][:m][keep], members[a][m:]])
                neg_dist[a] = torch.cat([neg_dist[a][:m][keep], neg_dist[a][m:]])
                radius[a] = -neg_dist[a][0] if members[a].numel() else -math.inf
                self.sizes[a] = members[a].numel()
        self._choose_next()
        return True


def coreset_indices(features: torch.Tensor, ratio: float, projection_dim: int = 128, seed: int = 0,
                    progress: bool = False, device: torch.device | str = "cpu", pool: int = 0) -> torch.Tensor:
    """PatchCore's subsampling: greedy k-center on a random projection, `ratio` of the rows (at least 1).

    `pool` > 0 runs the greedy search over a seeded random subset of that many rows (still selecting `ratio` of
    all rows): each greedy step costs in proportion to the rows searched, and on a fine grid (layer1 of a 256-px
    image, 4096 patches an image) neighbouring patches repeat each other, so a random pool keeps what the
    coreset needs at a fraction of the cost. 0 searches every row, as the paper.
    """
    n = features.shape[0]
    if ratio >= 1.0:
        return torch.arange(n)
    n_select = max(1, int(round(n * ratio)))
    generator = torch.Generator().manual_seed(seed)
    rows = None
    if 0 < pool < n:
        rows = torch.sort(torch.randperm(n, generator=generator)[:max(pool, n_select)]).values
        features = features[rows]
    projected = principal_axes(random_projection(features, projection_dim, seed))
    start = int(torch.randint(features.shape[0], (1,), generator=generator))
    chosen = greedy_coreset(projected.to(device), n_select, start=start, progress=progress)
    return chosen if rows is None else rows[chosen.cpu()]
