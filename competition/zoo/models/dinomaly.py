"""Dinomaly (Guo, Lu, Zhang, Liu, Zhang, CVPR 2025, "Dinomaly: The Less Is More Philosophy in Multi-Class
Unsupervised Anomaly Detection"), after the authors' reference code (ViTill, dinomaly_mvtec_uni.py).

A frozen ViT encoder (DINOv2 with registers, timm's `vit_small_patch14_reg4_dinov2`) gives the tokens of
its middle blocks (the paper: blocks 2..9 of 12, 0-based). Their mean, every token kept (class and
register tokens too), goes through the noisy bottleneck, an MLP (dim -> 4 dim -> dim, GELU) with
dropout 0.2 on its input, hidden and output as the "noise" that keeps the decoder from learning the
identity; a decoder of 8 pre-norm ViT blocks with Linear Attention (elu + 1 feature map, no softmax:
it cannot focus on the token it reconstructs) rebuilds them. Loose reconstruction: encoder blocks
and decoder blocks (in reverse order) are averaged in 2 groups of 4, and each decoder group is
compared with its encoder group as a whole. Loss: per group 1 - cos of the whole flattened map,
averaged over the batch and the groups, with global hard mining: the gradient of the positions
whose 1 - cos lies below the p-quantile of the batch is multiplied by 0.1, p rising linearly from 0
to 0.9 over the first 1000 steps. Anomaly map: the mean over groups of the per-position 1 - cos,
bilinearly upsampled to the canvas and smoothed with the reference's 5 x 5 Gaussian of sigma 4;
image score: the mean of the map's top 1 % values. Optimiser as the reference: AdamW-style, lr 2e-3
with 100 warmup steps and a cosine decay, weight decay 1e-4, gradient norm clipped at 0.1, batch
16, 10,000 steps; trainable Linear weights initialised from a normal of std 0.01 truncated at 0.03.

Deviations, and why:
- Weights. Offline there are no DINOv2 weights. The encoder is timm's DINOv2-with-registers
  architecture built with `pretrained=False`, loading `backbone_weights` when given (a local file,
  e.g. timm's DINOv2 weights, or "ssl": the experiment's own `competition pretrain` SimCLR output),
  else a seeded random initialisation. Without DINOv2 weights this is Dinomaly's recipe on random or
  in-domain features, not the paper's numbers. With `zoo.backbone_init: healthy` a random encoder's
  LayerScale factors start at 1 instead of DINOv2's 1e-5 (with which every untrained block is nearly
  the identity and all middle layers repeat the patch embedding), as the zoo makes random residual
  branches live for ResNets.
- Size. The paper resizes to 448 and centre-crops 392 (28 x 28 patches). Here the canvas
  (`zoo.image_size`) is resized inside the model to `input_size`, by default the multiple of the
  patch size 14 nearest the canvas (128 -> 126, 9 x 9 patches; 224 -> 224); maps come back at the
  canvas size, and are smoothed there (the reference smooths at 256 px).
- ViT-S (the paper's main results use ViT-B; it reports ViT-S too); `encoder_args` overrides timm's
  architecture (e.g. a depth-4, width-64 ViT in the tests), which then takes no DINOv2 weights.
- Optimiser: AdamW instead of StableAdamW with amsgrad, and the cosine decays to 0, not 2e-4 (the
  zoo's one engine and schedule).
- Budgets: `dinomaly-vits14` runs the paper's 10,000 steps (20 epochs of 500; a GPU job);
  `dinomaly-ssl` is CPU-sized (500 steps of batch 16, lr and hard-mining warmups scaled to 5 and 50
  steps). The best epoch is chosen on the zoo's validation set (the paper takes the last step).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from competition.preprocess import IMAGENET_MEAN, IMAGENET_STD
from competition.zoo.api import BackboneParams
from competition.zoo.components.frozen import WithFrozenParts, freeze
from competition.zoo.components.normalise import ImageNormalise
from competition.zoo.registry import register
from competition.zoo.trained import TrainedAnomalyModel, TrainParams

DEFAULT_ENCODER = "vit_small_patch14_reg4_dinov2"


@dataclass
class DinomalyParams(TrainParams, BackboneParams):
    # The paper: batch 16, 10,000 steps (here 20 epochs of 500 steps), lr 2e-3 warmed up over 100 steps
    # then cosine, weight decay 1e-4, gradient norm clipped at 0.1.
    backbone: str = DEFAULT_ENCODER
    encoder_args: dict[str, Any] = field(default_factory=dict)  # timm create_model overrides (depth, embed_dim, ...)
    input_size: int = 0  # encoder input side, a multiple of the patch size; 0: the multiple nearest the canvas
    encoder_layers: tuple[int, ...] = (2, 3, 4, 5, 6, 7, 8, 9)  # the middle blocks (0-based), shallow to deep
    groups: int = 2  # encoder layers and decoder blocks are each averaged in this many equal groups
    decoder_depth: int = 8
    bottleneck_dropout: float = 0.2
    hard_mining_quantile: float = 0.9  # final p: positions below this quantile of 1 - cos are "easy"
    hard_mining_factor: float = 0.1  # the gradient of easy positions is multiplied by this
    hard_mining_warmup_steps: int = 1000  # p rises linearly from 0 to its final value over these steps
    top_ratio: float = 0.01  # image score: mean of this share of the map's highest values
    map_sigma: float = 4.0
    map_kernel_size: int = 5  # the reference's Gaussian kernel is 5 x 5 (sigma 4)
    epochs: int = 20
    steps_per_epoch: int = 500
    batch_size: int = 16
    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = 2.0e-3
    weight_decay: float = 1.0e-4
    schedule: Literal["constant", "warmup_cosine", "multistep"] = "warmup_cosine"
    warmup_epochs: float = 0.2  # 100 of the 10,000 steps
    grad_clip: float = 0.1

    def __post_init__(self) -> None:
        layers = list(self.encoder_layers)
        if not layers or layers != sorted(set(layers)) or layers[0] < 0:
            raise ValueError(f"dinomaly: encoder_layers must be distinct block indices (0 or more) in increasing "
                             f"order, got {layers}")
        for key in ("groups", "decoder_depth", "epochs", "batch_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"dinomaly: {key} must be at least 1, got {getattr(self, key)}")
        if len(layers) % self.groups or self.decoder_depth % self.groups:
            raise ValueError(f"dinomaly: groups {self.groups} must divide both the {len(layers)} encoder_layers "
                             f"and decoder_depth {self.decoder_depth}")
        if not 0.0 <= self.bottleneck_dropout < 1.0:
            raise ValueError(f"dinomaly: bottleneck_dropout must be in [0, 1), got {self.bottleneck_dropout}")
        if not 0.0 <= self.hard_mining_quantile < 1.0:
            raise ValueError(f"dinomaly: hard_mining_quantile must be in [0, 1), got {self.hard_mining_quantile}")
        if not 0.0 <= self.hard_mining_factor <= 1.0:
            raise ValueError(f"dinomaly: hard_mining_factor must be in [0, 1], got {self.hard_mining_factor}")
        if self.hard_mining_warmup_steps < 0 or self.input_size < 0 or self.map_sigma < 0:
            raise ValueError("dinomaly: hard_mining_warmup_steps, input_size and map_sigma must be 0 or more, got "
                             f"{self.hard_mining_warmup_steps}, {self.input_size}, {self.map_sigma}")
        if not 0.0 < self.top_ratio <= 1.0:
            raise ValueError(f"dinomaly: top_ratio must be in (0, 1], got {self.top_ratio}")
        if self.map_kernel_size < 1 or self.map_kernel_size % 2 == 0:
            raise ValueError(f"dinomaly: map_kernel_size must be odd and positive, got {self.map_kernel_size}")


# ---------------------------------------------------------------- the parts

class NoisyBottleneck(nn.Module):
    """The reference's bMlp: dropout on the input, the hidden layer and the output of a GELU MLP."""

    def __init__(self, dim: int, hidden: int, dropout: float):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = self.drop(self.act(self.fc1(self.drop(x))))
        return self.drop(self.fc2(x))


class LinearAttention(nn.Module):
    """Linear attention (Katharopoulos et al. 2020) with the feature map elu(x) + 1, as the reference's
    LinearAttention2: out_s = phi(q_s) (sum_t phi(k_t) v_t^T) / (phi(q_s) . sum_t phi(k_t))."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dinomaly: decoder width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k = F.elu(q) + 1.0, F.elu(k) + 1.0
        kv = torch.einsum("bhsd,bhse->bhde", k, v)
        normaliser = 1.0 / torch.einsum("bhsd,bhd->bhs", q, k.sum(dim=2))
        out = torch.einsum("bhde,bhsd,bhs->bhse", kv, q, normaliser)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class DecoderBlock(nn.Module):
    """A pre-norm ViT block (LayerNorm eps 1e-8, MLP ratio 4, no LayerScale) with linear attention."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        from timm.layers import Mlp

        self.norm1 = nn.LayerNorm(dim, eps=1e-8)
        self.attn = LinearAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-8)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def create_vit_encoder(name: str, options: dict[str, Any], weights: bool | str, seed: int,
                       init: str = "timm") -> nn.Module:
    """timm ViT `name` (options override its architecture) with pooled-feature head removed, position
    embeddings resampled to any input grid, local weights or a seeded random init (see the module doc
    for `init` "healthy")."""
    import timm
    from timm.layers import LayerScale

    from competition.weights import load_local_weights, resolve_weights_path

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            model = timm.create_model(name, pretrained=False, num_classes=0, dynamic_img_size=True, **options)
        except (RuntimeError, ValueError, TypeError) as exc:
            raise ValueError(f"dinomaly: cannot build the ViT encoder {name!r} with encoder_args {options}: {exc}; "
                             "a timm vision transformer is needed (e.g. vit_small_patch14_reg4_dinov2)") from exc
    if not all(hasattr(model, a) for a in ("patch_embed", "blocks", "_pos_embed", "num_prefix_tokens")):
        raise ValueError(f"dinomaly: backbone {name!r} is not a timm VisionTransformer; use e.g. {DEFAULT_ENCODER}")
    if init == "healthy" and resolve_weights_path(weights, name, "zoo.backbone_weights") is None:
        for module in model.modules():
            if isinstance(module, LayerScale):
                nn.init.ones_(module.gamma)
    load_local_weights(model, weights, name, "zoo.backbone_weights")
    return model


def _init_trainable(module: nn.Module) -> None:
    """The reference's initialisation of the bottleneck and decoder."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.01, a=-0.03, b=0.03)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def gaussian_kernel_blur(maps: Tensor, sigma: float, kernel_size: int) -> Tensor:
    """(N, H, W) maps filtered by a `kernel_size` x `kernel_size` Gaussian of `sigma`, normalised to sum 1,
    zero padding (the reference's `get_gaussian_kernel` convolution)."""
    if sigma <= 0 or kernel_size <= 1:
        return maps
    x = torch.arange(kernel_size, dtype=maps.dtype, device=maps.device) - (kernel_size - 1) / 2
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = kernel / kernel.sum()
    pad = kernel_size // 2
    out = F.conv2d(maps[:, None], kernel.view(1, 1, 1, -1), padding=(0, pad))
    out = F.conv2d(out, kernel.view(1, 1, -1, 1), padding=(pad, 0))
    return out[:, 0]


def hard_mined_cosine_loss(encoder_maps: Sequence[Tensor], decoder_maps: Sequence[Tensor], quantile: float,
                           factor: float) -> Tensor:
    """The reference's global_cosine_hm_percent: per group, the mean over the batch of 1 - cos between the
    whole flattened encoder and decoder maps (B, C, h, w), averaged over the groups; in the backward pass
    the gradient reaching each decoder position whose 1 - cos is below the `quantile` of the batch's
    values (the "easy" ones) is multiplied by `factor`."""
    total = 0.0
    for encoded, decoded in zip(encoder_maps, decoder_maps):
        encoded = encoded.detach()
        with torch.no_grad():
            distance = 1 - F.cosine_similarity(encoded, decoded, dim=1)  # (B, h, w)
            keep = max(1, int(distance.numel() * (1 - quantile)))
            threshold = distance.flatten().topk(keep).values[-1]
            scale = torch.where(distance < threshold, factor, 1.0)[:, None]
        total = total + torch.mean(1 - F.cosine_similarity(encoded.flatten(1), decoded.flatten(1), dim=1))
        if decoded.requires_grad:
            decoded.register_hook(lambda grad, scale=scale: grad * scale.to(grad.dtype))
    return total / len(encoder_maps)


# ---------------------------------------------------------------- the model

class DinomalyModel(WithFrozenParts):
    """[0, 1] images -> grouped encoder and decoder maps (training) or (scores, maps) (forward)."""

    frozen_parts = ("encoder",)

    def __init__(self, encoder: nn.Module, encoder_layers: Sequence[int], groups: int = 2, decoder_depth: int = 8,
                 bottleneck_dropout: float = 0.2, input_size: int = 224, top_ratio: float = 0.01,
                 map_sigma: float = 4.0, map_kernel_size: int = 5, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD):
        super().__init__()
        self.encoder_layers = tuple(int(i) for i in encoder_layers)
        if self.encoder_layers[-1] >= len(encoder.blocks):
            raise ValueError(f"dinomaly: encoder_layers {list(self.encoder_layers)} reach beyond the encoder's "
                             f"{len(encoder.blocks)} blocks")
        self.patch_size = int(encoder.patch_embed.patch_size[0])
        if input_size % self.patch_size:
            raise ValueError(f"dinomaly: input_size {input_size} is not a multiple of the patch size "
                             f"{self.patch_size}; e.g. {round(input_size / self.patch_size) * self.patch_size}")
        encoder.blocks = encoder.blocks[: self.encoder_layers[-1] + 1]  # deeper blocks are never run
        self.normalise = ImageNormalise(mean, std)
        self.encoder = freeze(encoder)
        dim = int(encoder.embed_dim)
        heads = int(encoder.blocks[0].attn.num_heads)
        self.bottleneck = NoisyBottleneck(dim, 4 * dim, bottleneck_dropout)
        self.decoder = nn.ModuleList(DecoderBlock(dim, heads) for _ in range(decoder_depth))
        _init_trainable(self.bottleneck)
        _init_trainable(self.decoder)
        self.groups = int(groups)
        self.input_size = int(input_size)
        self.top_ratio = float(top_ratio)
        self.map_sigma = float(map_sigma)
        self.map_kernel_size = int(map_kernel_size)
        # optimizer steps taken (the hard-mining warmup reads it; saved in last.pt, so a resume continues it)
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def encode(self, images: Tensor) -> list[Tensor]:
        """(B, 3, S, S) in [0, 1] -> the tokens (B, N, C) of `encoder_layers`, prefix tokens included."""
        if images.shape[-1] != self.input_size or images.shape[-2] != self.input_size:
            images = F.interpolate(images, size=(self.input_size, self.input_size), mode="bilinear",
                                   align_corners=False)
        encoder = self.encoder
        x = encoder.patch_embed(self.normalise(images))
        x = encoder.norm_pre(encoder.patch_drop(encoder._pos_embed(x)))
        tokens = []
        for i, block in enumerate(encoder.blocks):
            x = block(x)
            if i in self.encoder_layers:
                tokens.append(x.float())
        return tokens

    def _grouped_maps(self, tokens: Sequence[Tensor]) -> list[Tensor]:
        """Layers averaged in `groups` consecutive groups, prefix tokens dropped, as (B, C, h, w) maps."""
        size = len(tokens) // self.groups
        side = self.input_size // self.patch_size
        prefix = int(self.encoder.num_prefix_tokens)
        maps = []
        for g in range(self.groups):
            fused = torch.stack(list(tokens[g * size:(g + 1) * size]), dim=1).mean(dim=1)[:, prefix:]
            maps.append(fused.transpose(1, 2).reshape(fused.shape[0], -1, side, side))
        return maps

    def reconstruct(self, images: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """Encoder groups and their reconstructions, each (B, C, h, w), shallow to deep."""
        tokens = self.encode(images)
        x = self.bottleneck(torch.stack(tokens, dim=1).mean(dim=1))
        decoded = []
        for block in self.decoder:
            x = block(x)
            decoded.append(x.float())
        return self._grouped_maps(tokens), self._grouped_maps(decoded[::-1])

    def anomaly_map(self, encoder_maps: Sequence[Tensor], decoder_maps: Sequence[Tensor],
                    size: tuple[int, int]) -> Tensor:
        maps = [F.interpolate((1 - F.cosine_similarity(e, d, dim=1))[:, None], size=size, mode="bilinear",
                              align_corners=True) for e, d in zip(encoder_maps, decoder_maps)]
        mean = torch.cat(maps, dim=1).mean(dim=1)
        return gaussian_kernel_blur(mean, self.map_sigma, self.map_kernel_size)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        encoder_maps, decoder_maps = self.reconstruct(images)
        maps = self.anomaly_map(encoder_maps, decoder_maps, tuple(images.shape[-2:]))
        top = max(1, int(maps.shape[-1] * maps.shape[-2] * self.top_ratio))
        return maps.flatten(1).topk(top, dim=1).values.mean(dim=1), maps


def hard_mining_quantile(step: int, final: float, warmup_steps: int) -> float:
    """p at optimizer step `step`: rising linearly from 0 to `final` over `warmup_steps`."""
    if warmup_steps <= 0:
        return final
    return final * min(1.0, step / warmup_steps)


def default_input_size(canvas: int, patch: int) -> int:
    """The multiple of `patch` nearest the canvas side (at least one patch)."""
    return max(patch, int(math.floor(canvas / patch + 0.5)) * patch)


class Dinomaly(TrainedAnomalyModel):
    family = "dinomaly"
    params_class = DinomalyParams
    params: DinomalyParams

    def build_model(self) -> nn.Module:
        p = self.params
        encoder = create_vit_encoder(p.backbone, dict(p.encoder_args), self.settings.backbone_weights,
                                     self.settings.seed, self.settings.backbone_init)
        patch = int(encoder.patch_embed.patch_size[0])
        input_size = int(p.input_size) or default_input_size(self.settings.image_size, patch)
        return DinomalyModel(encoder, p.encoder_layers, int(p.groups), int(p.decoder_depth),
                             float(p.bottleneck_dropout), input_size, float(p.top_ratio), float(p.map_sigma),
                             int(p.map_kernel_size), self.settings.mean, self.settings.std)

    def training_step(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        p = self.params
        quantile = hard_mining_quantile(int(self.model.steps_done), float(p.hard_mining_quantile),
                                        int(p.hard_mining_warmup_steps))
        encoder_maps, decoder_maps = self.model.reconstruct(batch["image"])
        loss = hard_mined_cosine_loss(encoder_maps, decoder_maps, quantile, float(p.hard_mining_factor))
        self.model.steps_done += 1
        return {"loss": loss, "hard_mining_p": torch.tensor(quantile)}

    def score_batch(self, images: Tensor) -> tuple[Tensor, Tensor]:
        return self.model(images)

    def scoring_module(self) -> nn.Module:
        self._check_fitted()
        return self.model.eval()  # its forward is the scoring: [0, 1] images -> (scores, maps)

    def fit_summary(self) -> dict:
        weights = self.settings.backbone_weights
        return {"encoder_weights": str(weights) if weights else f"random init (seed {self.settings.seed})",
                "input_size": self.model.input_size, "steps_done": int(self.model.steps_done)}


register("dinomaly-ssl", Dinomaly,
         "Dinomaly on the experiment's self-supervised ViT-S/14 (make pretrain), canvas resized to a multiple "
         "of 14 (CPU budget: 500 of 10,000 steps)",
         backbone_weights="ssl", epochs=10, steps_per_epoch=50, warmup_epochs=0.1, hard_mining_warmup_steps=50)
register("dinomaly-vits14", Dinomaly,
         "Dinomaly with the paper's recipe (10,000 steps, GPU) on a ViT-S/14 DINOv2-reg: random init or "
         "zoo.backbone_weights, so not the paper's DINOv2 numbers")
