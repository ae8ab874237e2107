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
    if kind == "swin":
        config = T.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 4],
                              window_size=4)
    else:
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
    from heartlora.method.model import attach_state
    assert attach_state(model).modules_to_save == ("head", "head_dist")


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


@pytest.mark.parametrize("kind", ["vit", "deit", "dinov2", "swin"])
def test_hf_vision_families_train(tmp_path, kind: str) -> None:
    """HF ViT, DeiT, DINOv2 and Swin attach and train on the installed transformers (CI runs 4.57 and 5.x): a few
    AdamW steps on a fixed batch lower the loss, the adapters moved, and the backbone's own weights did not."""
    torch.manual_seed(0)
    model = create_backbone(_hf_dir(tmp_path, kind), num_classes=3, pretrained=False)
    hl.attach(model, hl.HeartLoRAConfig(rank=4))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    adapters = [p.detach().clone() for p in hl.adapter_parameters(model)]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x, y = torch.rand(6, 3, 32, 32), torch.tensor([0, 1, 2, 0, 1, 2])
    losses = []
    for _ in range(8):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        losses.append(float(loss))
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert losses[-1] < losses[0]
    assert any(not torch.equal(a, p) for a, p in zip(adapters, hl.adapter_parameters(model)))
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


@pytest.mark.parametrize("batch_first", [False, True])
def test_torch_transformer_encoder_layers_keep_their_adapters_in_eval_mode(batch_first: bool) -> None:
    # nn.TransformerEncoderLayer(batch_first=True) reads self_attn.in_proj_bias before its fused inference path:
    # attach failed ("could not run Net … AttributeError"), and with verify=False the first eval forward did
    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            layer = torch.nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=batch_first)
            self.enc = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
            self.head = torch.nn.Linear(32, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.enc(x).mean(1 if batch_first else 0))

    torch.manual_seed(0)
    x = torch.randn(2, 5, 32) if batch_first else torch.randn(5, 2, 32)
    model = Net().eval()
    with torch.no_grad():
        base = model(x)
    hl.attach(model, hl.HeartLoRAConfig(targets=("q", "v"), rank=4), example_input=x)
    assert hl.coverage(model).summary() == "adapted 2 of 2 attention modules"
    with torch.no_grad():
        assert torch.allclose(model(x), base, atol=1e-6)  # B starts at zero
        for p in hl.adapter_parameters(model):
            p.normal_(0, 0.2)
        evaluated = model(x)
        model.train()
        trained = model(x)  # dropout 0: the same maths, never the fused path
    assert not torch.allclose(evaluated, base, atol=1e-3)  # the adapters reach the eval output
    assert torch.allclose(evaluated, trained, atol=1e-5)
