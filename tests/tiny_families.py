"""Tiny SDXL, SD3 and FLUX.1 models of the real pipeline classes, built from small configs (random
weights), saved as diffusers folders: what the family tests train on. No downloads: the CLIP
tokenizer is pristine-mini's, the T5 tokenizer is built here from a small Unigram vocabulary."""

from __future__ import annotations

import string
from pathlib import Path

import torch


def clip_tokenizer():
    from transformers import CLIPTokenizer

    import pristine.mini as mini

    return CLIPTokenizer.from_pretrained(Path(mini.MODEL_DIR) / "tokenizer", local_files_only=True)


def t5_tokenizer(max_length: int = 512):
    """A sentencepiece-style (Metaspace + Unigram) tokenizer in T5's fast class, ending prompts with </s>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    words = "a photo of the star heart circle on grass big small red blue in with and picture".split()
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    vocab += [("▁" + w, -1.0) for w in words] + [(c, -5.0) for c in string.ascii_letters + string.digits + string.punctuation]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>", extra_ids=0,
                           model_max_length=max_length)


def clip_text(projection: bool, hidden: int = 32):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=49408, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                            pad_token_id=49407, projection_dim=hidden)
    return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)


def t5_text(vocab: int, d_model: int):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=vocab, d_model=d_model, d_ff=2 * d_model, d_kv=16, num_layers=1,
                                   num_heads=2, relative_attention_num_buckets=8, decoder_start_token_id=0))


def vae(latent_channels: int = 4, **flow):
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32),
                         latent_channels=latent_channels, norm_num_groups=16, sample_size=16, **flow)


def build_tiny_sdxl(folder: Path) -> Path:
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=2,
                                block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                                use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
                                transformer_layers_per_block=(1, 1), projection_class_embeddings_input_dim=6 * 8 + 32,
                                cross_attention_dim=64, norm_num_groups=16)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       timestep_spacing="leading", steps_offset=1)
    pipe = StableDiffusionXLPipeline(vae=vae(), text_encoder=clip_text(False), text_encoder_2=clip_text(True),
                                     tokenizer=clip_tokenizer(), tokenizer_2=clip_tokenizer(), unet=unet,
                                     scheduler=scheduler, add_watermarker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def build_tiny_sd3(folder: Path) -> Path:
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(0)
    t5_tok = t5_tokenizer(256)
    # CLIP-L and CLIP-G hidden states (32 + 32) are padded up to T5's width, the joint attention width
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                                        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=64,
                                        caption_projection_dim=16, pooled_projection_dim=64, pos_embed_max_size=16)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae(shift_factor=0.0609, scaling_factor=1.5305, use_quant_conv=False, use_post_quant_conv=False),
        text_encoder=clip_text(True), tokenizer=clip_tokenizer(), text_encoder_2=clip_text(True),
        tokenizer_2=clip_tokenizer(), text_encoder_3=t5_text(len(t5_tok), 64), tokenizer_3=t5_tok)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def build_tiny_flux(folder: Path, guidance_embeds: bool = True) -> Path:
    """dev-style (guidance_embeds, resolution-dependent shift) or schnell-style (neither)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(0)
    t5_tok = t5_tokenizer(512)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, guidance_embeds=guidance_embeds, axes_dims_rope=(4, 4, 8))
    if guidance_embeds:
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                    base_image_seq_len=256, max_image_seq_len=4096)
    else:
        scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)
    pipe = FluxPipeline(transformer=transformer, scheduler=scheduler,
                        vae=vae(shift_factor=0.1159, scaling_factor=0.3611, use_quant_conv=False, use_post_quant_conv=False),
                        text_encoder=clip_text(False), tokenizer=clip_tokenizer(), text_encoder_2=t5_text(len(t5_tok), 32),
                        tokenizer_2=t5_tok)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder
