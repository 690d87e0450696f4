"""One-hot MLP conditional VAE, the paper's MNIST model (Section 4.1, Appendix B).

Encoder q(z|x,c): [x, onehot(c)] -> 512 -> 256 -> (mu, log sigma^2), dim 8.
Decoder p(x|z,c): [z, onehot(c)] -> 256 -> 512 -> 784, sigmoid (Bernoulli means).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selective_amnesia import faults
from selective_amnesia.io.artifacts import environment, save_tensors, write_json


@dataclass
class CVAEConfig:
    image_size: int = 28
    channels: int = 1
    num_classes: int = 10
    hidden_dims: list[int] = field(default_factory=lambda: [512, 256])
    latent_dim: int = 8

    def __post_init__(self) -> None:
        if self.image_size < 1 or self.channels < 1 or self.num_classes < 2 or self.latent_dim < 1:
            raise ValueError("image_size, channels, latent_dim must be >= 1 and num_classes >= 2")
        if not self.hidden_dims or any(h < 1 for h in self.hidden_dims):
            raise ValueError("hidden_dims must be a non-empty list of positive widths")


def num_parameters(config: CVAEConfig) -> int:
    """The parameter count of ``ConditionalVAE(config)``, computed without building it."""
    x_dim = config.channels * config.image_size**2
    h = list(config.hidden_dims)
    chains = [[x_dim + config.num_classes, *h], [config.latent_dim + config.num_classes, *reversed(h), x_dim]]
    linear = sum(a * b + b for dims in chains for a, b in zip(dims[:-1], dims[1:], strict=True))
    return linear + 2 * (h[-1] * config.latent_dim + config.latent_dim)  # to_mu, to_logvar


def _mlp(dims: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(dims) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class ConditionalVAE(nn.Module):
    """Satisfies ``ConditionalGenerativeModel``; images are in [0, 1], shape (B, C, H, W)."""

    family = "cvae"
    data_range = (0.0, 1.0)
    loss_entries = "sum"  # BCE summed over pixels, as the paper
    per_image_seeds = False  # sample() takes one generator: a set is drawn in fixed blocks

    def __init__(self, config: CVAEConfig | None = None) -> None:
        super().__init__()
        self.config = config or CVAEConfig()
        c = self.config
        self.x_dim = c.channels * c.image_size * c.image_size
        h = list(c.hidden_dims)
        self.encoder = nn.Sequential(_mlp([self.x_dim + c.num_classes, *h]), nn.ReLU())
        self.to_mu = nn.Linear(h[-1], c.latent_dim)
        self.to_logvar = nn.Linear(h[-1], c.latent_dim)
        self.decoder = _mlp([c.latent_dim + c.num_classes, *reversed(h), self.x_dim])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.config.channels, self.config.image_size, self.config.image_size)

    def _onehot(self, cond: Tensor) -> Tensor:
        if cond.dtype != torch.int64 or cond.dim() != 1:
            raise ValueError(f"cond must be int64 labels of shape (B,), got {cond.dtype} {tuple(cond.shape)}")
        # a comparison instead of F.one_hot, which calls .item() and so cannot run under torch.func.vmap
        classes = torch.arange(self.config.num_classes, device=cond.device)
        return (cond[:, None] == classes).to(self.to_mu.weight.dtype)

    def check_labels(self, cond: Tensor) -> None:
        """Raise ``ValueError`` for labels outside [0, num_classes)."""
        if cond.numel() and (int(cond.min()) < 0 or int(cond.max()) >= self.config.num_classes):
            raise ValueError(
                f"labels must lie in [0, {self.config.num_classes}), got {cond.unique().tolist()}"
            )

    def forgetting(self) -> AbstractContextManager[None]:
        """The mode forgetting trains in: the same as training (no label dropout to switch off)."""
        return nullcontext()

    def decode_logits(self, z: Tensor, cond: Tensor) -> Tensor:
        logits: Tensor = self.decoder(torch.cat([z, self._onehot(cond)], dim=1))
        return logits

    def draw_noise(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """The reparameterisation noise for one NELBO estimate per sample."""
        device = generator.device if generator is not None else x.device  # CPU generator: any model device
        return torch.randn(
            x.shape[0], self.config.latent_dim, generator=generator, device=device, dtype=x.dtype
        ).to(x.device)

    def nelbo(
        self, x: Tensor, cond: Tensor, *, generator: torch.Generator | None = None, noise: Any = None
    ) -> Tensor:
        """Per-sample NELBO = BCE summed over pixels + KL(q(z|x,c) || N(0, I)); shape (B,)."""
        flat = x.reshape(x.shape[0], -1)
        if flat.shape[1] != self.x_dim:
            raise ValueError(f"expected images of shape (B, {self.image_shape}), got {tuple(x.shape)}")
        hidden = self.encoder(torch.cat([flat, self._onehot(cond)], dim=1))
        mu: Tensor = self.to_mu(hidden)
        logvar: Tensor = self.to_logvar(hidden)
        eps = self.draw_noise(x, generator) if noise is None else noise
        z = mu + eps * torch.exp(0.5 * logvar)
        logits = self.decode_logits(z, cond)
        # BCE on logits == the paper's BCE on sigmoid outputs, without log(0) at saturated pixels
        bce = F.binary_cross_entropy_with_logits(logits, flat, reduction="none").sum(dim=1)
        kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(dim=1)
        return bce + kl

    @torch.no_grad()
    def sample(self, cond: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """Decoder means for z ~ N(0, I): images in [0, 1], shape (B, C, H, W)."""
        self.check_labels(cond)
        weight = self.to_mu.weight
        z = torch.randn(
            cond.shape[0],
            self.config.latent_dim,
            generator=generator,
            device=generator.device if generator is not None else weight.device,
            dtype=weight.dtype,
        ).to(weight.device)
        return torch.sigmoid(self.decode_logits(z, cond.to(self.to_mu.weight.device))).reshape(
            -1, *self.image_shape
        )

    @staticmethod
    def to_uint8(x: Tensor) -> Tensor:
        return (x.clamp(0, 1) * 255).round().to(torch.uint8)

    @staticmethod
    def from_uint8(x: Tensor) -> Tensor:
        """uint8 [0, 255] -> float [0, 1], the model's pixel range."""
        return x.float() / 255.0

    def save_pretrained(self, path: str | Path, extra: dict[str, Any] | None = None) -> None:
        """Write ``model.safetensors`` then ``config.json`` (the config marks the directory complete)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").unlink(missing_ok=True)  # an interrupted overwrite must not look complete
        save_tensors(path / "model.safetensors", self.state_dict(), {"family": self.family})
        faults.point("model.weights_written")
        write_json(
            path / "config.json",
            {"family": self.family, **asdict(self.config), "environment": environment(), **(extra or {})},
        )
