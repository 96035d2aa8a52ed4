"""A tiny SD1.5-shaped model built from configs (random weights), for loading and training tests."""

from pathlib import Path

import torch


def build_tiny_sd(folder: Path, prediction_type: str = "epsilon", layers_per_block: int = 2, sd2: bool = False) -> Path:
    """SD1.5-shaped; `sd2`: SD2.x's differences (linear projections in and out of attention, per-block head
    sizes, v-prediction)."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    import pristine.mini as mini

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=layers_per_block,
                                block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=(2, 4) if sd2 else 2, use_linear_projection=sd2, norm_num_groups=16)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32), latent_channels=4,
                        norm_num_groups=16, sample_size=16)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, max_position_embeddings=77, bos_token_id=49406,
                                        eos_token_id=49407, pad_token_id=49407))
    tokenizer = CLIPTokenizer.from_pretrained(Path(mini.MODEL_DIR) / "tokenizer", local_files_only=True)
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              prediction_type="v_prediction" if sd2 else prediction_type, clip_sample=False)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def build_tiny_clip(folder: Path, text_width: int = 32, image_size: int = 16) -> Path:
    """A tiny CLIPModel (random weights) whose text projection takes the tiny model's text width (CLIF's stage 1)."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    config = CLIPConfig(text_config=dict(vocab_size=49408, hidden_size=text_width, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=49406,
                                         eos_token_id=49407, pad_token_id=49407),
                        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                           image_size=image_size, patch_size=4),
                        projection_dim=24)
    CLIPModel(config).save_pretrained(folder, safe_serialization=True)
    return folder
