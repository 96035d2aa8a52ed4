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


def new_unet(sample_size: int = LATENT_SIZE):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**{**UNET_CONFIG, "sample_size": sample_size})


def new_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(**SCHEDULER_CONFIG)


def new_clip():
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(text_config=TEXT_CONFIG, vision_config=VISION_CONFIG, projection_dim=TEXT_WIDTH)
    return CLIPModel(config)
