import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from tiny_model import build_tiny_sd  # noqa: E402

from pristine.attention import capture_cross_attention, cross_attention_layers  # noqa: E402


def test_capture_keeps_outputs_and_yields_normalised_maps(tmp_path):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(build_tiny_sd(tmp_path / "m") / "unet")
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 77, 32)
    with torch.no_grad():
        plain = unet(x, t, ctx).sample
        with capture_cross_attention(unet) as maps:
            captured = unet(x, t, ctx).sample
    assert torch.allclose(plain, captured, atol=1e-5)
    assert set(maps) == set(cross_attention_layers(unet)) and maps
    for name, m in maps.items():
        assert m.shape[0] == 2 and m.shape[-1] == 77
        assert torch.allclose(m.sum(-1), torch.ones_like(m.sum(-1)), atol=1e-5)
    assert not any(type(p).__name__ == "CaptureCrossAttention" for p in unet.attn_processors.values())
