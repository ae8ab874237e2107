"""Every layout in the registry puts each head's adapters on that head's rows: checked on a family that uses it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from conftest import make_family
from torch import nn

import heartlora.method as hl
from heartlora.backbones.probe import row_checks

D, H = 32, 4


class Holder(nn.Module):
    """One attention module on a (1, 16, D) token input, plus extra call arguments."""

    def __init__(self, attn: nn.Module, **kwargs: Any) -> None:
        super().__init__()
        self.attn, self.kwargs = attn, kwargs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x, **self.kwargs)


def _tokens() -> torch.Tensor:
    return torch.randn(2, 16, D, generator=torch.Generator().manual_seed(0))


def _timm_eva() -> tuple[nn.Module, Any]:
    from timm.models.eva import EvaAttention
    try:
        attn = EvaAttention(D, H, qkv_bias=True, qkv_fused=True, scale_norm=False)
    except TypeError:  # timm before 1.0.10 has no scale_norm
        attn = EvaAttention(D, H, qkv_bias=True, qkv_fused=True)
    with torch.no_grad():
        attn.q_bias.normal_(), attn.v_bias.normal_()
    return Holder(attn), _tokens()


def _timm_tinyvit() -> tuple[nn.Module, Any]:
    from timm.models.tiny_vit import Attention
    return Holder(Attention(D, key_dim=8, num_heads=H, attn_ratio=2, resolution=(4, 4))), _tokens()


def _timm_twins_gsa() -> tuple[nn.Module, Any]:
    from timm.models.twins import GlobalSubSampleAttn
    return Holder(GlobalSubSampleAttn(D, H, sr_ratio=2), size=(4, 4)), _tokens()


def _timm_convit_gpsa() -> tuple[nn.Module, Any]:
    import timm
    from timm.models.convit import GPSA
    if tuple(int(p) for p in timm.__version__.split(".")[:3]) < (1, 0, 20):
        pytest.skip("older timm's GPSA keeps float32 position indices, so it cannot run in float64")
    return Holder(GPSA(D, H)), _tokens()


def _hf_clip() -> tuple[nn.Module, Any]:
    from transformers import CLIPVisionConfig, CLIPVisionModel
    cfg = CLIPVisionConfig(hidden_size=D, intermediate_size=64, num_hidden_layers=2, num_attention_heads=H,
                           image_size=32, patch_size=8, attn_implementation="eager")
    return CLIPVisionModel(cfg), torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _family(name: str) -> Callable[[], tuple[nn.Module, Any]]:
    def make() -> tuple[nn.Module, Any]:
        model, x = make_family(name)
        return model, x[:1]
    return make


# layout name -> families using it; a layout registered without one here fails test_every_layout_has_a_family
FAMILIES: dict[str, dict[str, Callable[[], tuple[nn.Module, Any]]]] = {
    "fused_qkv": {"timm_vit": _family("timm_vit"), "timm_swin": _family("timm_swin")},
    "fused_qkv_weight": {"timm_eva_qv_bias": _timm_eva},
    "interleaved_qkv": {"timm_tinyvit": _timm_tinyvit},
    "q_kv_pair": {"timm_twins_gsa": _timm_twins_gsa, "timm_convit_gpsa": _timm_convit_gpsa},
    "separate_qkvo": {"hf_clip_vision": _hf_clip},  # HF ViT's naming depends on the version: tests/test_attach.py
    "bert_style": {"bert": _family("bert")},
    "torch_mha": {"torchvision_vit": _family("torchvision_vit")},
}
CASES = [(layout, fam) for layout, fams in FAMILIES.items() for fam in fams]


def test_every_layout_has_a_family() -> None:
    assert {lay.name for lay in hl.LAYOUTS} <= set(FAMILIES), "add a test family for the new layout here"


@pytest.mark.parametrize("layout,family", CASES)
def test_rows_are_the_heads_rows(layout: str, family: str) -> None:
    torch.manual_seed(0)
    model, x = FAMILIES[layout][family]()
    model.eval()
    hl.attach(model, hl.HeartLoRAConfig(targets=("q", "k", "v", "o"), rank=4), example_input=x)
    assert {lay.layout for lay in hl.attention_layers(model)} == {layout}
    results = row_checks(model, x)
    for name, res in results.items():
        assert set(res) >= {"v"}, (name, res)
        assert all(v == "ok" for v in res.values()), (name, res)


@pytest.mark.parametrize("layout,family", CASES)
def test_one_head_adapter_changes_only_its_rows(layout: str, family: str) -> None:
    torch.manual_seed(0)
    model, x = FAMILIES[layout][family]()
    hl.attach(model, hl.HeartLoRAConfig(targets=("q", "k", "v", "o"), rank=4), example_input=x)
    layer = hl.attention_layers(model)[0]
    for target, proj in layer.projections.items():
        per_head = proj.lora_B if target != "o" else proj.lora_A
        with torch.no_grad():
            for p in proj.parameters():
                p.normal_()
            rows = per_head.view(layer.num_heads, -1, per_head.shape[-1]) if target != "o" else \
                per_head.view(per_head.shape[0], layer.num_heads, -1)
            keep = 1  # only head 1's share stays nonzero
            mask = torch.zeros(layer.num_heads, dtype=torch.bool)
            mask[keep] = True
            if target != "o":
                rows[~mask] = 0
            else:
                rows[:, ~mask] = 0
        delta = proj.delta_weight()
        touched = delta.abs().sum(1 if target != "o" else 0).nonzero().flatten()
        assert set(touched.tolist()) == set(proj.index[keep].tolist()), target


def test_verify_catches_an_attention_that_bypasses_the_wrapper() -> None:
    class ReadsWeight(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.num_heads = H
            self.qkv, self.proj = nn.Linear(D, 3 * D), nn.Linear(D, D)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            v = torch.nn.functional.linear(x, self.qkv.base_layer.weight).chunk(3, -1)[2]
            return self.proj(v)

    import heartlora.method.layouts as lay
    lay.QKV_BLOCKS.add(lay.class_path(ReadsWeight()))
    try:
        model, x = Holder(ReadsWeight()), _tokens()
        before = [p.clone() for p in model.parameters()]
        with pytest.raises(hl.UnsupportedBackboneError if hasattr(hl, "UnsupportedBackboneError") else Exception,
                           match=r"no gradient reaches attn\.q"):
            hl.attach(model, hl.HeartLoRAConfig(targets=("q", "v")), example_input=x)
        assert not hl.is_adapted(model) and isinstance(model.attn.qkv, nn.Linear)
        assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    finally:
        lay.QKV_BLOCKS.discard(lay.class_path(ReadsWeight()))


def test_verify_restores_factors_and_leaves_no_grads() -> None:
    model, x = make_family("timm_vit")
    torch.manual_seed(3)
    hl.attach(model, hl.HeartLoRAConfig(targets=("q", "v", "o"), rank=4), verify=False)
    saved = [p.detach().clone() for p in hl.adapter_parameters(model)]
    from heartlora.method.model import verify_adapters
    model.train()
    verify_adapters(model, x[:1])
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(a, b) for a, b in zip(saved, hl.adapter_parameters(model)))
    assert all(p.grad is None for p in model.parameters())


def test_coverage_names_what_was_left() -> None:
    import timm
    model = timm.create_model("volo_d1_224", pretrained=False, img_size=64, num_classes=3)
    hl.attach(model, hl.HeartLoRAConfig(rank=2), example_input=torch.rand(1, 3, 64, 64))
    cov = hl.coverage(model)
    assert len(cov.adapted) == len(hl.attention_layers(model)) > 0
    assert cov.unadapted and all(u.cls == "OutlookAttention" for u in cov.unadapted)
    assert cov.summary().startswith(f"adapted {len(cov.adapted)} of {cov.total} attention modules; not adapted: "
                                    f"{len(cov.unadapted)} × OutlookAttention")


def test_no_attention_says_so() -> None:
    import timm
    with pytest.raises(hl.UnsupportedBackboneError if hasattr(hl, "UnsupportedBackboneError") else Exception,
                       match=r"no attention layer found in ResNet.*Families that work|no attention layer found in "
                             r"ResNet"):
        hl.attach(timm.create_model("resnet18", pretrained=False, num_classes=3))
