"""pristine-mini's architecture: diffusers/transformers configs sized for 32x32 images on a CPU."""

from __future__ import annotations

IMAGE_SIZE = 32
LATENT_SIZE = 8
TEXT_WIDTH = 128

VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(32, 64, 64),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=16,
    sample_size=IMAGE_SIZE,
)

# v3's autoencoder: one downsampling fewer, a 4x16x16 latent. At 4x8x8 the development concepts'
# markings do not survive a round trip whatever the channels or the training (tools/vae_capacity.py:
# 41% of the references read back as the concept, 52% with 8 channels, 59% with 16; 4x16x16: 93%).
VAE16_CONFIG = dict(
    VAE_CONFIG,
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    block_out_channels=(32, 64),
)

UNET_CONFIG = dict(
    sample_size=LATENT_SIZE,
    in_channels=4,
    out_channels=4,
    layers_per_block=1,
    block_out_channels=(64, 128, 192),
    down_block_types=("CrossAttnDownBlock2D",) * 3,
    up_block_types=("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=TEXT_WIDTH,
    attention_head_dim=4,
    norm_num_groups=32,
)

SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
    clip_sample=False,
    steps_offset=1,
)

TEXT_CONFIG = dict(
    vocab_size=49408,
    hidden_size=TEXT_WIDTH,
    intermediate_size=4 * TEXT_WIDTH,
    num_hidden_layers=4,
    num_attention_heads=4,
    max_position_embeddings=77,
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=49407,
    projection_dim=TEXT_WIDTH,
)

VISION_CONFIG = dict(
    image_size=IMAGE_SIZE,
    patch_size=4,
    num_channels=3,
    hidden_size=128,
    intermediate_size=512,
    num_hidden_layers=4,
    num_attention_heads=4,
    projection_dim=TEXT_WIDTH,
)


def new_vae(config: dict = VAE_CONFIG):
    from diffusers import AutoencoderKL

    return AutoencoderKL(**config)


def latent_size(vae_config) -> int:
    """The side of a VAE's latent for pristine-mini's 32-px pictures."""
    return IMAGE_SIZE // 2 ** (len(vae_config["block_out_channels"]) - 1)


# v3's denoiser on the 16x16 latent: v2's UNet under one more level at the top, convolutions only, so
# the three levels with attention keep v2's grids (8x8, 4x4, 2x2) and its weights carry over as they
# are. A step (batch 64, one CPU thread, forward and backward) costs 1.22 s against 0.84 s for v2 at 8x8,
# where v2's own three levels run at 16x16 cost 3.09 s; the top level gives the markings their pixels.
UNET16_CONFIG = dict(
    UNET_CONFIG,
    sample_size=2 * LATENT_SIZE,
    block_out_channels=(64,) + UNET_CONFIG["block_out_channels"],
    down_block_types=("DownBlock2D",) + UNET_CONFIG["down_block_types"],
    up_block_types=UNET_CONFIG["up_block_types"] + ("UpBlock2D",),
)


def unet_config(grid: int) -> dict:
    """The denoiser's config for a latent grid of side `grid` (8: v2, 16: v3)."""
    configs = {LATENT_SIZE: UNET_CONFIG, 2 * LATENT_SIZE: UNET16_CONFIG}
    if grid not in configs:
        raise ValueError(f"pristine-mini has no denoiser for a {grid}x{grid} latent (8 or 16)")
    return dict(configs[grid])


def new_unet(grid: int = LATENT_SIZE):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**unet_config(grid))


def grow_unet(unet):
    """A 16x16-latent denoiser holding an 8x8 one's weights: its down blocks move one level in (the
    new top level starts fresh), its up blocks keep their places (the last one gains an upsampler),
    and the stem and head keep theirs. Every weight of `unet` lands somewhere, at its own shape."""
    grown = new_unet(2 * LATENT_SIZE)

    def moved(key):
        parts = key.split(".")
        if parts[0] == "down_blocks":
            parts[1] = str(int(parts[1]) + 1)
        return ".".join(parts)

    weights, targets = {moved(k): v for k, v in unet.state_dict().items()}, grown.state_dict()
    last = len(unet.up_blocks) - 1  # its last up block, now one level from the top, upsamples
    fresh = ("down_blocks.0.", f"up_blocks.{last}.upsamplers.", f"up_blocks.{last + 1}.")
    misfits = [k for k, v in weights.items() if k not in targets or targets[k].shape != v.shape]
    misfits += [k for k in targets if k not in weights and not k.startswith(fresh)]
    if misfits:
        raise ValueError(f"cannot grow this UNet: it is not pristine-mini's 8x8 denoiser ({misfits[0]} does not fit)")
    grown.load_state_dict(weights, strict=False)
    return grown.to(unet.dtype)


def new_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(**SCHEDULER_CONFIG)


def new_clip():
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(text_config=TEXT_CONFIG, vision_config=VISION_CONFIG, projection_dim=TEXT_WIDTH)
    return CLIPModel(config)
