"""Attach on the families users reach for: CLIP and SigLIP through ``hf:``, DeiT distilled, every HF naming."""

from __future__ import annotations

import pytest
import torch

import heartlora as hl
from heartlora.backbones import create_backbone
from heartlora.backbones.probe import row_checks


def _hf_dir(tmp_path, kind: str) -> str:
    import transformers as T

    common = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "image_size": 32, "patch_size": 8}
    config = {"clip": T.CLIPVisionConfig, "siglip": T.SiglipVisionConfig, "vit": T.ViTConfig,
              "deit": T.DeiTConfig, "dinov2": T.Dinov2Config}[kind](**common)
    path = tmp_path / kind
    config.save_pretrained(path)
    return f"hf:{path}"


@pytest.mark.parametrize("kind,attention", [("clip", 2), ("siglip", 3), ("vit", 2), ("deit", 2), ("dinov2", 2)])
def test_hf_vision_families_adapt_every_layer(tmp_path, kind: str, attention: int) -> None:
    """Every encoder layer (and SigLIP's attention-pooling head) adapted on its own rows, on the installed
    transformers' naming (q_proj/out_proj in 5.x, attention.attention.query/output.dense in 4.x)."""
    model = create_backbone(_hf_dir(tmp_path, kind), num_classes=3, pretrained=False).eval()
    x = torch.rand(1, 3, 32, 32)
    hl.attach(model, hl.HeartLoRAConfig(targets=("q", "k", "v", "o"), rank=2))
    cov = hl.coverage(model)
    assert len(cov.adapted) == attention and not cov.unadapted and not cov.partial, cov.summary()
    for name, res in row_checks(model, x).items():
        assert set(res) == {"qk", "v", "vo"} and all(v == "ok" for v in res.values()), (name, res)


def test_deit_distilled_trains_and_stores_both_heads() -> None:
    import timm

    model = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, img_size=32, num_classes=3,
                              depth=2)
    hl.attach(model, hl.HeartLoRAConfig(rank=2))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad and "lora" not in n}
    assert trainable == {"head.weight", "head.bias", "head_dist.weight", "head_dist.bias"}
    from heartlora.method.model import _state
    assert _state(model).modules_to_save == ("head", "head_dist")


def test_verify_needs_an_input_it_can_tell() -> None:
    class Bare(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = torch.nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.attn(x, x, x)[0]

    with pytest.raises(hl.ConfigError, match="example_input="):
        hl.attach(Bare())
    model = hl.attach(Bare(), example_input=torch.randn(1, 5, 8))
    assert hl.coverage(model).summary() == "adapted 1 of 1 attention modules"
