"""PatchCore (Roth et al., "Towards Total Recall in Industrial Anomaly Detection", CVPR 2022).

Locally aware patch features from two middle backbone layers (each map averaged over 3x3
neighbourhoods, the deeper one resized to the shallower one's grid, optionally pooled to a common
width as in the paper's pre-projection), a memory bank of the normal patches subsampled by greedy
k-center coreset (`components.coreset`), and nearest-neighbour scoring: the image score is
the largest patch distance s* = ||m_test,* - m*||, reweighted by eq. 7,
s = (1 - exp||m_test,* - m*|| / sum_{m in N_b(m*)} exp||m_test,* - m||) * s*,
where N_b(m*) are the b nearest memory patches of m*. The map is the patch distances, upsampled
and smoothed with a Gaussian of sigma 4. Search is exact, batched matmuls in torch (faiss when
`search: faiss` and it is installed).

Deviation, entry `patchcore-resnet18-layer1`: layer1 alone (64 channels, 3x3-averaged, on the 64x64 grid of a
256-px input), not the paper's layer2+3, and a 0.5% coreset, not 1-10%. Offline the backbone is often a random
network, whose deeper layers carry less about the input (as for PaDiM's `padim-resnet18-layer1`); layer1's grid
holds 4096 patches an image, so the coreset keeps a smaller share to stay affordable on a CPU. On bsdata_tiles
(photos not aligned, where PaDiM's per-position Gaussians compare unlike patches) it ranks the test images at AUROC
0.848, its out-of-fold scores correlate with PaDiM's at 0.64, and the stack's Private rises 0.862 -> 0.889; on deeppcb
a fold fits in 482 s, too slow for configs/real.yaml (README, "PatchCore on layer1 of a random network").
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from competition.zoo.api import AnomalyModel, BackboneParams, ImageSet, ValidationSet
from competition.zoo.components.coreset import coreset_indices
from competition.zoo.components.features import (
    BackboneScorer,
    FeatureExtractor,
    score_from_features,
    shared_extractor,
    with_backbone_statistics,
)
from competition.zoo.components.maps import SmoothedMaps
from competition.zoo.components.neighbours import CHUNK, faiss_neighbours, nearest_neighbours
from competition.zoo.registry import register


@dataclass
class PatchCoreParams(BackboneParams):
    layers: tuple[int, ...] = (2, 3)  # timm out_indices: resnet layer2 and layer3
    embed_dim: int | None = None  # None: keep every channel (128 + 256 for resnet18); int: the paper's pooling
    coreset_ratio: float = 0.1  # share of the normal patches kept in the memory bank (1.0 keeps all)
    # 0: the greedy coreset searches every normal patch (the paper); N: a seeded random pool of N patches (the
    # memory bank still keeps coreset_ratio of all patches), for fine grids where the search dominates the fit
    coreset_pool: int = 0
    projection_dim: int = 128  # random projection for the coreset distances
    num_neighbours: int = 9  # b of eq. 7; 1 disables the reweighting
    blur_sigma: float = 4.0
    search: Literal["torch", "faiss"] = "torch"  # torch (exact, batched) | faiss (IndexFlatL2, if installed)

    def __post_init__(self) -> None:
        if not 0.0 < self.coreset_ratio <= 1.0:
            raise ValueError(f"patchcore: coreset_ratio must be in (0, 1], got {self.coreset_ratio}")


class PatchEmbedding(nn.Module):
    """Backbone maps -> (B, D, h, w) locally aware patch features on the first map's grid."""

    def __init__(self, embed_dim: int | None = None, neighbourhood: int = 3):
        super().__init__()
        self.embed_dim = embed_dim
        self.neighbourhood = neighbourhood

    def forward(self, maps: list[torch.Tensor]) -> torch.Tensor:
        size = maps[0].shape[-2:]
        pad = self.neighbourhood // 2
        pooled = []
        for m in maps:
            m = F.avg_pool2d(m, self.neighbourhood, stride=1, padding=pad, count_include_pad=False)
            if m.shape[-2:] != size:
                m = F.interpolate(m, size=size, mode="bilinear", align_corners=False)
            pooled.append(m)
        if self.embed_dim is None:
            return torch.cat(pooled, dim=1)
        # the paper's pre-projection: each layer pooled over channels to embed_dim, then all together
        b, _, h, w = pooled[0].shape
        per_layer = [F.adaptive_avg_pool1d(p.permute(0, 2, 3, 1).reshape(-1, 1, p.shape[1]), self.embed_dim)
                     for p in pooled]
        joined = F.adaptive_avg_pool1d(torch.cat(per_layer, dim=2), self.embed_dim)
        return joined.reshape(b, h, w, self.embed_dim).permute(0, 3, 1, 2)


class PatchCoreModel(nn.Module):
    """Backbone maps -> patch embeddings -> image scores (eq. 7 reweighting) and patch-distance maps.

    The fitted state is the memory bank (and its rows' squared norms), buffers registered empty.
    """

    def __init__(self, embed_dim: int | None = None, num_neighbours: int = 9, search: str = "torch"):
        super().__init__()
        self.embedding = PatchEmbedding(embed_dim)
        self.register_buffer("memory_bank", torch.empty(0, 0))
        self.register_buffer("bank_sq", torch.empty(0))
        self.register_buffer("backbone_statistics", torch.empty(0))  # BatchNorm statistics of a healthy random backbone
        self.num_neighbours = num_neighbours
        self.search = search
        self._faiss_index = None

    def set_memory_bank(self, memory_bank: torch.Tensor) -> None:
        self.memory_bank = memory_bank.float().contiguous()
        self.bank_sq = (self.memory_bank ** 2).sum(1)
        self._faiss_index = None

    def _search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.search == "faiss":
            if self._faiss_index is None:
                import faiss  # optional; the "faiss" search option needs it installed

                self._faiss_index = faiss.IndexFlatL2(self.memory_bank.shape[1])
                self._faiss_index.add(self.memory_bank.cpu().numpy())
            return faiss_neighbours(self._faiss_index, queries, k)
        query_chunk = None if torch.jit.is_tracing() else CHUNK
        return nearest_neighbours(queries, self.memory_bank, self.bank_sq, k=k, query_chunk=query_chunk)

    def score_embeddings(self, embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, D, h, w) patch embeddings -> (scores (B,), patch distances (B, h, w))."""
        # the batch size stays symbolic (-1, gather) so that a traced graph takes any batch
        _, d, h, w = embeddings.shape
        patches = embeddings.permute(0, 2, 3, 1).reshape(-1, d).float()
        dist, idx = self._search(patches, 1)
        patch_dist = dist[:, 0].reshape(-1, h * w)
        nn_idx = idx[:, 0].reshape(-1, h * w)
        best = torch.argmax(patch_dist, dim=1, keepdim=True)  # m_test,*: the most anomalous patch of each image
        s_star = patch_dist.gather(1, best)[:, 0]
        m_star = nn_idx.gather(1, best)[:, 0]
        if self.num_neighbours > 1:
            # N_b(m*): the b nearest memory patches of m* (m* itself first, at distance 0)
            _, support = self._search(self.memory_bank.index_select(0, m_star), self.num_neighbours)
            test_patch = patches.reshape(-1, h * w, d).gather(1, best[:, :, None].expand(-1, 1, d))
            support_dist = torch.linalg.vector_norm(self.memory_bank[support] - test_patch, dim=2)
            weight = 1.0 - torch.softmax(support_dist, dim=1)[:, 0]
            scores = weight * s_star
        else:
            scores = s_star
        return scores, patch_dist.reshape(-1, h, w)

    def forward(self, maps: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Backbone maps of the model's layers -> (scores (B,), patch distances (B, h, w))."""
        return self.score_embeddings(self.embedding(maps))


class PatchCore(AnomalyModel):
    family = "patchcore"
    params_class = PatchCoreParams
    params: PatchCoreParams

    @classmethod
    def extractor_layers(cls, params: PatchCoreParams) -> tuple[int, ...]:
        return tuple(params.layers)

    def build_model(self) -> PatchCoreModel:
        p = self.params
        return PatchCoreModel(p.embed_dim, int(p.num_neighbours), p.search)

    def _extractor(self) -> FeatureExtractor:
        return shared_extractor(self.params.backbone, self.extractor_layers(self.params), self.settings)

    def _fit(self, images: ImageSet, validation: ValidationSet | None) -> None:
        model = self.build_model()
        extractor = with_backbone_statistics(self._extractor(), model, self.batchnorm_images(images))
        bank = None  # (images, patches, dim): every normal patch in float16 (half the memory), filled in place
        for idx, maps in extractor.extract(images, desc="patchcore fit"):
            emb = model.embedding(extractor.select(maps, self.params.layers))
            if bank is None:
                bank = torch.empty(len(images), emb.shape[2] * emb.shape[3], emb.shape[1], dtype=torch.float16)
            bank[torch.as_tensor(idx)] = emb.permute(0, 2, 3, 1).flatten(1, 2).half().cpu()
        bank = bank.flatten(0, 1)
        started, cpu_started = time.perf_counter(), time.process_time()
        keep = coreset_indices(bank, float(self.params.coreset_ratio), int(self.params.projection_dim),
                               self.settings.seed, progress=self.settings.progress, device=self.device,
                               pool=int(self.params.coreset_pool))
        memory = bank[keep].float()
        self.fit_info = {"patches": int(bank.shape[0]), "memory_bank": int(memory.shape[0]),
                         "embedding_dim": int(memory.shape[1]),
                         "coreset_seconds": round(time.perf_counter() - started, 2),
                         "coreset_cpu_seconds": round(time.process_time() - cpu_started, 2)}
        del bank
        model.set_memory_bank(memory)
        self.model = model.to(self.device)

    def _head(self) -> SmoothedMaps:
        return SmoothedMaps(self.model, self.settings.image_size, float(self.params.blur_sigma))

    @torch.inference_mode()
    def _predict(self, images: ImageSet, with_maps: bool):
        extractor = with_backbone_statistics(self._extractor(), self.model)
        head = self._head()

        def score_batch(feats):
            return head([f.to(self.device) for f in extractor.select(feats, self.params.layers)])

        return score_from_features(extractor, images, self.settings.image_size, with_maps, "patchcore score",
                                   score_batch)

    def scoring_module(self) -> BackboneScorer | None:
        self._check_fitted()
        if self.params.search != "torch":
            return None
        extractor = with_backbone_statistics(self._extractor(), self.model)
        return BackboneScorer(extractor, self.params.layers, self._head()).eval()

    @property
    def export_unsupported(self) -> str:
        return f"search {self.params.search!r} runs a faiss index outside torch; search 'torch' exports"


register("patchcore-resnet18", PatchCore,
         "PatchCore on resnet18 layer2+3 (384-d patches), 10% greedy coreset, eq. 7 reweighting")
register("patchcore-resnet18-layer1", PatchCore,
         "PatchCore on resnet18 layer1 alone (64-d patches on the 4-px grid), 0.5% greedy coreset: for random networks",
         layers=(1,), coreset_ratio=0.005)
register("patchcore-resnet18-full", PatchCore,
         "PatchCore on resnet18 layer2+3 with the full memory bank (no coreset): the coreset's reference",
         coreset_ratio=1.0)
register("patchcore-wide-resnet50", PatchCore,
         "PatchCore as in the paper: wide_resnet50_2 layer2+3 pooled to 1024-d, 10% coreset (slow on CPU)",
         backbone="wide_resnet50_2", embed_dim=1024)
register("patchcore-ssl", PatchCore,
         "PatchCore (layer2+3, 10% coreset) on the experiment's self-supervised backbone (make pretrain)",
         backbone_weights="ssl")
