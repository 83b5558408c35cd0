"""Speed of PatchCore's exact nearest-neighbour search, by block shape, against the previous implementation.

    python bench/neighbours_speed.py                  # 2 threads, layer1 of a 256-px image: 4096 x 64 queries
    python bench/neighbours_speed.py --threads 1 --bank 5161 --dim 64

Prints images per second (an image = `--patches` queries) for the previous search (separate subtract/add ops,
topk(1), blocks of 2048 queries x 16384 rows) and for `nearest_neighbours` at several block shapes, and checks
that every variant returns the same neighbours. Random features stand in for patches: the search is exact, so
its cost does not depend on the data.
"""
from __future__ import annotations

import argparse
import time

import torch

from competition.zoo.components.neighbours import nearest_neighbours


def previous_search(queries: torch.Tensor, bank: torch.Tensor, bank_sq: torch.Tensor) -> torch.Tensor:
    """The search as it was before the fused, cache-sized blocks (k = 1): the reference for speed."""
    found = []
    for qs in range(0, queries.shape[0], 2048):
        q = queries[qs:qs + 2048]
        d2 = ((q * q).sum(1, keepdim=True) - 2.0 * (q @ bank.T) + bank_sq[None]).clamp_(min=0)
        found.append(torch.topk(d2, 1, dim=1, largest=False).indices[:, 0])
    return torch.cat(found)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--patches", type=int, default=4096, help="queries per image (layer1 of 256 px: 64 x 64)")
    parser.add_argument("--bank", type=int, default=5161, help="memory-bank rows (0.5%% of bsdata_tiles' fold)")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    queries = torch.randn(args.images * args.patches, args.dim, generator=generator)
    bank = torch.randn(args.bank, args.dim, generator=generator)
    bank_sq = (bank * bank).sum(1)
    reference = previous_search(queries, bank, bank_sq)

    def timed(search) -> tuple[float, bool]:
        best = float("inf")
        for _ in range(args.repeats):
            started = time.perf_counter()
            found = search()
            best = min(best, time.perf_counter() - started)
        return args.images / best, bool(torch.equal(found, reference))

    print(f"{args.images} images x {args.patches} queries against {args.bank} x {args.dim}, "
          f"{args.threads} thread(s), best of {args.repeats}")
    rate, _ = timed(lambda: previous_search(queries, bank, bank_sq))
    print(f"  previous (2048 x 16384, topk)   {rate:6.1f} img/s")
    for query_chunk, bank_chunk in [(2048, 16384), (1024, 1024), (512, 512), (2048, 2048)]:
        rate, same = timed(lambda qc=query_chunk, bc=bank_chunk: nearest_neighbours(
            queries, bank, bank_sq, 1, query_chunk=qc, bank_chunk=bc)[1][:, 0])
        print(f"  nearest_neighbours {query_chunk:5d} x {bank_chunk:5d} {rate:6.1f} img/s"
              f"{'' if same else '  (neighbours differ!)'}")


if __name__ == "__main__":
    main()
