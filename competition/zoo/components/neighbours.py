"""Exact k-nearest-neighbour search by batched matmuls (PatchCore's memory-bank lookup)."""
from __future__ import annotations

import torch

# Block sides of the search: a 1024 x 1024 float32 distance block (4 MB) stays in cache (docstring below)
CHUNK = 1024


def nearest_neighbours(queries: torch.Tensor, bank: torch.Tensor, bank_sq: torch.Tensor | None = None,
                       k: int = 1, query_chunk: int | None = CHUNK,
                       bank_chunk: int = CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact k nearest rows of `bank` for each query: (distances (Q, k), indices (Q, k)).

    `bank_sq` (the rows' squared norms) can be passed when the bank is searched many times.
    `query_chunk` None takes every query at once, as a traced graph must: a loop over query chunks
    would be unrolled for the example's number of queries.
    With a short feature (PatchCore's layer1: 64 channels) the matmul is cheap and the distance block's passes
    (add, clamp, minimum) are bound by memory: blocks of 1024 x 1024 stay in cache. An image's 4096 queries against
    5161 rows of 64, 2 threads: 5.5 images/s for the previous search (separate ops, topk(1), 2048 x 16384 blocks),
    13 with the fused ops and row minimum in those blocks, 19-30 in 1024 x 1024 blocks (bench/neighbours_speed.py).
    """
    if bank_sq is None:
        bank_sq = (bank * bank).sum(1)
    k = min(k, bank.shape[0])
    all_dist, all_idx = [], []
    for qs in ([None] if query_chunk is None else range(0, queries.shape[0], query_chunk)):
        q = queries if qs is None else queries[qs:qs + query_chunk]
        q_sq = (q * q).sum(1, keepdim=True)
        best_d = best_i = None
        for bs in range(0, bank.shape[0], bank_chunk):
            b = bank[bs:bs + bank_chunk]
            # ||b||^2 - 2 q.b by one fused matmul-add, then + ||q||^2 and the clamp in place: no extra block passes
            d2 = torch.addmm(bank_sq[bs:bs + bank_chunk][None], q, b.T, alpha=-2.0).add_(q_sq).clamp_(min=0)
            if k == 1:  # a row minimum is about twice as fast as topk(1)
                d, i = d2.min(dim=1, keepdim=True)
            else:
                d, i = torch.topk(d2, min(k, d2.shape[1]), dim=1, largest=False)
            i = i + bs
            if best_d is None:
                best_d, best_i = d, i
            else:
                cat_d, cat_i = torch.cat([best_d, d], 1), torch.cat([best_i, i], 1)
                best_d, sel = torch.topk(cat_d, k, dim=1, largest=False)
                best_i = torch.gather(cat_i, 1, sel)
        all_dist.append(best_d.sqrt())
        all_idx.append(best_i)
    return torch.cat(all_dist), torch.cat(all_idx)


def faiss_neighbours(index, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same from a faiss IndexFlatL2 (optional dependency): (distances, indices) on the queries' device."""
    d2, idx = index.search(queries.float().cpu().numpy(), k)
    return (torch.from_numpy(d2).clamp_(min=0).sqrt().to(queries.device),
            torch.from_numpy(idx).long().to(queries.device))
