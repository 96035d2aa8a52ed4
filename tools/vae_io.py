"""What the VAE tools share: renders to tensors, a round trip through a VAE, and back to pictures."""
import numpy as np
import torch


def to_tensor(images) -> torch.Tensor:
    """uint8 HxWx3 pictures -> a contiguous float batch in [-1, 1]."""
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1).contiguous()


def round_trip(vae, x: torch.Tensor) -> torch.Tensor:
    """Encode (the posterior mean) and decode, no denoiser."""
    with torch.no_grad():
        return vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)


def to_uint8(x: torch.Tensor) -> list:
    return list(((x + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy())
