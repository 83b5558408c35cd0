"""GANomaly (Akçay, Atapour-Abarghouei & Breckon, "GANomaly: Semi-Supervised Anomaly Detection via
Adversarial Training", ACCV 2018), after the authors' reference code (samet-akcay/ganomaly).

The generator is an encoder G_E -> decoder G_D -> encoder E chain of DCGAN blocks (4 x 4 convolutions
of stride 2 with BatchNorm and LeakyReLU 0.2 down to a 4 x 4 grid, a last 4 x 4 convolution to the
latent z of `latent_dim`; the decoder mirrors it with transposed convolutions, ReLU and a Tanh image),
trained on normal images only: x -> z = G_E(x) -> x_hat = G_D(z) -> z_hat = E(x_hat). The
discriminator D is a DCGAN encoder with a one-logit head. Generator loss w_adv L_adv + w_con L_con +
w_enc L_enc with the paper's weights 1, 50, 1: L_adv = ||f(x) - f(x_hat)||^2 (feature matching on D's
last feature layer), L_con = ||x - x_hat||_1, L_enc = ||z - z_hat||^2 (means over elements, as the
reference). D learns real against fake by binary cross-entropy and is re-initialised when its loss
falls below 1e-5. Adam (lr 2e-4, betas 0.5 / 0.999), batch 64, 15 epochs; DCGAN initialisation
(convolutions N(0, 0.02), BatchNorm weights N(1, 0.02)). The anomaly score is the latent distance
mean((z - z_hat)^2), a global score: there is no map (`has_maps = False`).

How the two updates run on the one training engine: every step computes the generator loss through
D with D's parameters out of the graph, and D's loss on x_hat detached, and one Adam steps both
networks on the sum. Adam being elementwise, that is the reference's two optimisers stepping G, then D
on the same x_hat.

Deviations from the paper:
- images at the zoo's canvas (a power of two, e.g. 64 or 128 px; the paper's are 32 px), RGB in
  [0, 1] mapped to the Tanh range [-1, 1] inside the model;
- D's head returns a logit and its loss is binary cross-entropy with logits, the same as the
  reference's sigmoid + BCE but stable (and allowed under float16 autocast);
- the epoch kept is the one with the best AUROC on the validation set the zoo builds inside the
  training folds (held-out normals, painted defects); the reference picks it on the test set;
- the score uses the squared L2 distance of the reference code; the paper's equation writes the L1
  norm (`score_norm: l1` for it);
- `ganomaly` is CPU-sized: 32 base channels (the paper's 64) and batches of 16 (the paper's 64), so
  that 15 epochs over a few hundred normals still make a few hundred steps (the paper's data sets
  are far larger); `ganomaly-paper` has the paper's width and batch.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from competition.zoo.registry import register
from competition.zoo.trained import TrainedAnomalyModel, TrainParams


@dataclass
class GANomalyParams(TrainParams):
    # The paper: Adam lr 2e-4, beta1 0.5, batch 64, 15 epochs, nz 100, 64 base channels.
    epochs: int = 15
    batch_size: int = 64
    optimizer: Literal["adamw", "adam", "sgd"] = "adam"
    lr: float = 2.0e-4
    betas: tuple[float, float] = (0.5, 0.999)
    weight_decay: float = 0.0
    latent_dim: int = 100
    width: int = 64  # base channels of the encoders, decoder and discriminator (ngf = ndf)
    extra_layers: int = 0  # 3 x 3 convolutions added at the first scale (the reference's n_extra_layers)
    w_adv: float = 1.0
    w_con: float = 50.0
    w_enc: float = 1.0
    score_norm: Literal["l2", "l1"] = "l2"  # l2: mean squared latent distance (reference code) | l1 (paper)

    def __post_init__(self) -> None:
        for key in ("latent_dim", "width", "epochs", "batch_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"ganomaly: {key} must be at least 1, got {getattr(self, key)}")
        if self.extra_layers < 0:
            raise ValueError(f"ganomaly: extra_layers must be 0 or more, got {self.extra_layers}")
        for key in ("w_adv", "w_con", "w_enc"):
            if getattr(self, key) < 0:
                raise ValueError(f"ganomaly: {key} must be 0 or more, got {getattr(self, key)}")


def dcgan_encoder(image_size: int, out_channels: int, width: int, extra_layers: int = 0) -> nn.Sequential:
    """(B, 3, S, S) -> (B, out_channels, 1, 1): strided 4 x 4 convolutions down to 4 x 4, then a 4 x 4 one."""
    layers: list[nn.Module] = [nn.Conv2d(3, width, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, inplace=True)]
    size, channels = image_size // 2, width
    for _ in range(extra_layers):
        layers += [nn.Conv2d(channels, channels, 3, 1, 1, bias=False), nn.BatchNorm2d(channels),
                   nn.LeakyReLU(0.2, inplace=True)]
    while size > 4:
        layers += [nn.Conv2d(channels, 2 * channels, 4, 2, 1, bias=False), nn.BatchNorm2d(2 * channels),
                   nn.LeakyReLU(0.2, inplace=True)]
        size, channels = size // 2, 2 * channels
    layers.append(nn.Conv2d(channels, out_channels, 4, 1, 0, bias=False))
    return nn.Sequential(*layers)


def dcgan_decoder(image_size: int, latent_dim: int, width: int, extra_layers: int = 0) -> nn.Sequential:
    """(B, latent_dim, 1, 1) -> (B, 3, S, S) in [-1, 1]: the encoder mirrored with transposed convolutions."""
    channels, size = width // 2, 4
    while size != image_size:
        channels, size = 2 * channels, 2 * size
    layers: list[nn.Module] = [nn.ConvTranspose2d(latent_dim, channels, 4, 1, 0, bias=False),
                               nn.BatchNorm2d(channels), nn.ReLU(inplace=True)]
    size = 4
    while size < image_size // 2:
        layers += [nn.ConvTranspose2d(channels, channels // 2, 4, 2, 1, bias=False), nn.BatchNorm2d(channels // 2),
                   nn.ReLU(inplace=True)]
        channels, size = channels // 2, 2 * size
    for _ in range(extra_layers):
        layers += [nn.Conv2d(channels, channels, 3, 1, 1, bias=False), nn.BatchNorm2d(channels),
                   nn.ReLU(inplace=True)]
    layers += [nn.ConvTranspose2d(channels, 3, 4, 2, 1, bias=False), nn.Tanh()]
    return nn.Sequential(*layers)


def dcgan_initialise(module: nn.Module) -> None:
    """DCGAN weights: convolutions N(0, 0.02), BatchNorm weights N(1, 0.02) and biases 0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, 0.02)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


class Discriminator(nn.Module):
    """DCGAN encoder to one logit; `forward` returns (logits (B,), features of the last layer before the head)."""

    def __init__(self, image_size: int, width: int, extra_layers: int = 0):
        super().__init__()
        layers = list(dcgan_encoder(image_size, 1, width, extra_layers))
        self.features = nn.Sequential(*layers[:-1])
        self.head = layers[-1]

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        features = self.features(images)
        return self.head(features).flatten(), features


@contextmanager
def outside_the_graph(module: nn.Module) -> Iterator[None]:
    """`module`'s parameters receive no gradient inside the block (its inputs still do)."""
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


class GANomalyModel(nn.Module):
    """[0, 1] images -> (scores (B,), maps: the score spread over the image) in eval mode."""

    def __init__(self, image_size: int, latent_dim: int = 100, width: int = 64, extra_layers: int = 0,
                 score_norm: str = "l2"):
        super().__init__()
        if image_size < 16 or image_size & (image_size - 1):
            raise ValueError(f"ganomaly: zoo.image_size must be a power of two of at least 16 (DCGAN blocks halve "
                             f"it down to 4 x 4), got {image_size}")
        self.encoder = dcgan_encoder(image_size, latent_dim, width, extra_layers)  # G_E
        self.decoder = dcgan_decoder(image_size, latent_dim, width, extra_layers)  # G_D
        self.reencoder = dcgan_encoder(image_size, latent_dim, width, extra_layers)  # E
        self.discriminator = Discriminator(image_size, width, extra_layers)  # D
        self.score_norm = score_norm
        dcgan_initialise(self)

    def generate(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(x in [-1, 1], x_hat, z, z_hat) of [0, 1] images."""
        x = images * 2.0 - 1.0
        z = self.encoder(x)
        fake = self.decoder(z)
        return x, fake, z.flatten(1), self.reencoder(fake).flatten(1)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        _, _, z, z_hat = self.generate(images)
        difference = (z - z_hat).float()
        scores = difference.abs().sum(1) if self.score_norm == "l1" else (difference ** 2).mean(1)
        return scores, scores[:, None, None].expand(-1, images.shape[-2], images.shape[-1])


class GANomaly(TrainedAnomalyModel):
    family = "ganomaly"
    params_class = GANomalyParams
    params: GANomalyParams
    has_maps = False

    def build_model(self) -> GANomalyModel:
        p = self.params
        return GANomalyModel(self.settings.image_size, int(p.latent_dim), int(p.width), int(p.extra_layers),
                             p.score_norm)

    def training_step(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        p, model = self.params, self.model
        discriminator = model.discriminator
        if getattr(self, "_reinitialise_discriminator", False):  # D had won: start it afresh, as the reference
            with torch.no_grad():
                dcgan_initialise(discriminator)
            self._reinitialise_discriminator = False
        x, fake, z, z_hat = model.generate(batch["image"])
        with outside_the_graph(discriminator):
            _, real_features = discriminator(x)
            _, fake_features = discriminator(fake)
        adversarial = F.mse_loss(fake_features.float(), real_features.float())
        contextual = F.l1_loss(fake.float(), x.float())
        encoder = F.mse_loss(z_hat.float(), z.float())
        generator = p.w_adv * adversarial + p.w_con * contextual + p.w_enc * encoder
        real_logits, _ = discriminator(x)
        fake_logits, _ = discriminator(fake.detach())
        real_loss = F.binary_cross_entropy_with_logits(real_logits.float(), torch.ones_like(real_logits.float()))
        fake_loss = F.binary_cross_entropy_with_logits(fake_logits.float(), torch.zeros_like(fake_logits.float()))
        discriminator_loss = 0.5 * (real_loss + fake_loss)
        if discriminator_loss.item() < 1e-5:
            self._reinitialise_discriminator = True
        return {"loss": generator + discriminator_loss, "generator": generator, "adversarial": adversarial,
                "contextual": contextual, "encoder": encoder, "discriminator": discriminator_loss}

    def score_batch(self, images: Tensor) -> tuple[Tensor, Tensor]:
        return self.model(images)

    def scoring_module(self) -> nn.Module:
        self._check_fitted()
        return self.model.eval()  # its forward is the scoring: [0, 1] images -> (scores, maps)


register("ganomaly", GANomaly,
         "GANomaly: encoder-decoder-encoder GAN, latent distance score, no map (CPU-sized: 32 base channels, "
         "batch 16, 15 epochs)", width=32, batch_size=16)
register("ganomaly-paper", GANomaly,
         "GANomaly as in the paper: 64 base channels, nz 100, Adam 2e-4, batch 64, 15 epochs")
