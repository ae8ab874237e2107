"""Every layout in the registry puts each head's adapters on that head's rows: checked on a family that uses it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import make_family
from torch import nn

import heartlora.method as hl
from heartlora.backbones.probe import row_checks
from heartlora.errors import UnsupportedBackboneError
from heartlora.method.layouts import block_index

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


def _timm_pvt_v2_linear() -> tuple[nn.Module, Any]:
    """PVTv2-li: an activation on the pooled keys' and values' input (not between the heads and o)."""
    from timm.models.pvt_v2 import Attention
    return Holder(Attention(D, H, linear_attn=True), feat_size=[4, 4]), _tokens()


def _timm_convit_gpsa() -> tuple[nn.Module, Any]:
    import timm
    from timm.models.convit import GPSA
    if tuple(int(p) for p in timm.__version__.split(".")[:3]) < (1, 0, 20):
        pytest.skip("older timm's GPSA keeps float32 position indices, so it cannot run in float64")
    return Holder(GPSA(D, H)), _tokens()


def _map(chans: int = D, size: int = 4) -> torch.Tensor:
    return torch.randn(1, chans, size, size, generator=torch.Generator().manual_seed(0))


def _timm_visformer_conv() -> tuple[nn.Module, Any]:
    from timm.models.visformer import Attention
    return Holder(Attention(D, num_heads=H)), _map()


def _timm_coatnet_conv() -> tuple[nn.Module, Any]:
    from timm.models.maxxvit import Attention2d
    return Holder(Attention2d(D, dim_head=D // H, head_first=True)), _map()


def _unsilenced(attn: nn.Module) -> nn.Module:
    """Random init starts LeViT's output BatchNorm weight at zero (the attention's output would be constant)."""
    with torch.no_grad():
        for m in attn.modules():
            if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d) and not m.weight.any():
                m.weight.fill_(1.0)
    return attn


def _timm_levit() -> tuple[nn.Module, Any]:
    from timm.models.levit import Attention
    # act_layer=Identity: LeViT's activation between the heads and o would hide v's rows from the checks
    return Holder(_unsilenced(Attention(D, key_dim=8, num_heads=H, attn_ratio=2, resolution=4,
                                       act_layer=nn.Identity))), _tokens()


def _timm_levit_conv_downsample() -> tuple[nn.Module, Any]:
    from timm.models.levit import AttentionDownsample
    return Holder(_unsilenced(AttentionDownsample(D, 2 * D, key_dim=8, num_heads=H, attn_ratio=2, stride=2,
                                                  resolution=4, use_conv=True, act_layer=nn.Identity))), _map()


def _timm_efficientformerv2() -> tuple[nn.Module, Any]:
    from timm.models.efficientformer_v2 import Attention2d
    return Holder(Attention2d(D, key_dim=8, num_heads=H, attn_ratio=2, resolution=4, act_layer=nn.Identity)), _map()


def _zero_rel_pos(attn: nn.Module) -> nn.Module:
    """BoTNet and HaloNet add a relative-position term computed from q; zeroed, scaling q by c and k by 1/c must
    leave the output unchanged."""
    with torch.no_grad():
        attn.pos_embed.height_rel.zero_(), attn.pos_embed.width_rel.zero_()
    return attn


def _timm_botnet() -> tuple[nn.Module, Any]:
    from timm.layers.bottleneck_attn import BottleneckAttn
    return Holder(_zero_rel_pos(BottleneckAttn(D, feat_size=(4, 4), num_heads=H, qk_ratio=0.5))), _map()


def _timm_halonet() -> tuple[nn.Module, Any]:
    from timm.layers.halo_attn import HaloAttn
    return Holder(_zero_rel_pos(HaloAttn(D, feat_size=(8, 8), num_heads=H, block_size=4, halo_size=1,
                                         qk_ratio=0.5))), _map(size=8)


def _timm_parallel(fuse_out_proj: bool) -> Callable[[], tuple[nn.Module, Any]]:
    def make() -> tuple[nn.Module, Any]:
        import inspect

        import timm
        from timm.models.vision_transformer import ParallelScalingBlock
        if "fuse_out_proj" not in inspect.signature(ParallelScalingBlock).parameters:
            pytest.skip(f"timm {timm.__version__}'s ParallelScalingBlock has no fuse_out_proj (added in later 1.0.x)")
        return Holder(ParallelScalingBlock(D, H, mlp_ratio=2.0, fuse_out_proj=fuse_out_proj)), _tokens()
    return make


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
    "fused_qkv": {"timm_vit": _family("timm_vit"), "timm_swin": _family("timm_swin"),
                  "timm_visformer_conv": _timm_visformer_conv},
    "fused_qkv_weight": {"timm_eva_qv_bias": _timm_eva},
    "interleaved_qkv": {"timm_tinyvit": _timm_tinyvit, "timm_coatnet_conv": _timm_coatnet_conv},
    "norm_wrapped": {"timm_levit": _timm_levit, "timm_levit_conv_downsample": _timm_levit_conv_downsample,
                     "timm_efficientformerv2": _timm_efficientformerv2},
    "parallel_block": {"timm_vit_parallel": _timm_parallel(False), "timm_vit_parallel_fused_out": _timm_parallel(True)},
    "byob_conv": {"timm_botnet": _timm_botnet, "timm_halonet": _timm_halonet},
    "q_kv_pair": {"timm_twins_gsa": _timm_twins_gsa, "timm_convit_gpsa": _timm_convit_gpsa,
                  "timm_pvt_v2_linear": _timm_pvt_v2_linear},
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
        with pytest.raises(UnsupportedBackboneError, match=r"no gradient reaches attn\.q"):
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
    with pytest.raises(UnsupportedBackboneError, match=r"no attention layer found in ResNet: heartlora adapts "
                                                      r"transformer attention, e\.g\. timm ViT.*docs/BACKBONES\.md"):
        hl.attach(timm.create_model("resnet18", pretrained=False, num_classes=3))


def test_conv1x1_adapter_is_the_linear_adapter_on_channels() -> None:
    """A 1×1 conv adapter computes what a Linear adapter computes on channels-last inputs; merge and unmerge are
    exact; a conv that is not a Linear over channels is refused."""
    from heartlora.method.layer import HeadLoRAConv1x1, HeadLoRAProjection, wrap_projection

    torch.manual_seed(0)
    conv = nn.Conv2d(8, 12, 1)
    lin = nn.Linear(8, 12)
    with torch.no_grad():
        lin.weight.copy_(conv.weight.view(12, 8)), lin.bias.copy_(conv.bias)
    wc, wl = wrap_projection(conv), wrap_projection(lin)
    assert isinstance(wc, HeadLoRAConv1x1) and type(wl) is hl.HeadLoRALinear
    for w in (wc, wl):
        for target, off in (("q", 0), ("v", 6)):  # two heads of 3 rows each, v in the second half only
            proj = HeadLoRAProjection(target, "x", block_index(off, 2, 3), 8, 12, 2, 1.0, 32, None)
            w.lora[target] = proj
    for pc, pl in zip(wc.lora.parameters(), wl.lora.parameters()):
        with torch.no_grad():
            pc.normal_(), pl.copy_(pc)
    x = torch.randn(2, 8, 3, 5)
    y = wc(x)
    assert torch.allclose(y, wl(x.movedim(1, -1)).movedim(-1, 1), atol=1e-6)
    base = conv(x)
    assert not torch.allclose(y, base, atol=1e-3)
    wc.merge()
    assert torch.allclose(wc(x), y, atol=1e-5) and wc.merged
    wc.unmerge()
    assert torch.equal(wc(x), y) and torch.equal(conv.weight.view(12, 8), lin.weight)
    for bad in (nn.Conv2d(8, 12, 3), nn.Conv2d(8, 12, 1, stride=2), nn.Conv2d(8, 12, 1, groups=4)):
        with pytest.raises(ValueError, match="1×1"):
            wrap_projection(bad)


class LlamaStyleGQA(nn.Module):
    """Grouped-query attention with no attribute naming its k/v head count: 2 k/v heads for 4 query heads."""

    def __init__(self, kv_heads: int = 2) -> None:
        super().__init__()
        self.num_heads, self.kv, self.d = H, kv_heads, D // H
        self.q_proj, self.o_proj = nn.Linear(D, D), nn.Linear(D, D)
        self.k_proj, self.v_proj = nn.Linear(D, kv_heads * self.d), nn.Linear(D, kv_heads * self.d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q = self.q_proj(x).view(b, n, H, self.d).transpose(1, 2)
        k, v = (p(x).view(b, n, self.kv, self.d).transpose(1, 2).repeat_interleave(H // self.kv, dim=1)
                for p in (self.k_proj, self.v_proj))
        return self.o_proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, D))


def _timm_rope_gqa() -> nn.Module:
    attention = pytest.importorskip("timm.layers.attention")
    if not hasattr(attention, "AttentionRope"):
        pytest.skip("this timm has no AttentionRope (grouped-query attention)")
    return attention.AttentionRope(D, H, qkv_fused=False, num_kv_heads=2)


@pytest.mark.parametrize("make", [_timm_rope_gqa, LlamaStyleGQA], ids=["timm_num_kv_heads", "rows_only"])
def test_grouped_query_attention_adapts_q_and_o_and_refuses_k_v(make: Callable[[], nn.Module]) -> None:
    """k/v heads shared by a group of query heads cannot be split by query head: k and v are refused with the
    reason, q and o adapted, and switching one head off leaves every other head's attention output unchanged."""
    torch.manual_seed(0)
    model, x = Holder(make()), _tokens()
    hl.attach(model, hl.HeartLoRAConfig(targets=("q", "k", "v", "o"), rank=4), example_input=x)
    layer = hl.attention_layers(model)[0]
    assert set(layer.projections) == {"q", "o"}
    cov = hl.coverage(model)
    assert set(cov.partial["attn"]) == {"k", "v"} and "grouped-query attention" in cov.partial["attn"]["k"]
    with torch.no_grad():
        for p in hl.adapter_parameters(model):
            p.normal_(0, 0.3)
    seen = []
    o = model.attn.proj if hasattr(model.attn, "proj") else model.attn.o_proj
    hook = o.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().view(2, 16, H, -1)))
    model.eval()
    model(x)
    hl.deactivate_heads(model, heads=[("attn", 1)])
    model(x)
    hook.remove()
    before, after = seen
    for h in (0, 2, 3):
        assert torch.equal(before[:, :, h], after[:, :, h]), h
    assert not torch.equal(before[:, :, 1], after[:, :, 1])
    with pytest.raises(UnsupportedBackboneError, match="k, v: grouped-query attention"):
        hl.attach(Holder(make()), hl.HeartLoRAConfig(targets=("k", "v"), rank=4), example_input=x)


class WideValueHeads(nn.Module):
    """Every projection split by the same 4 heads, v's heads twice as wide as q's and k's (an attention ratio)."""

    def __init__(self) -> None:
        super().__init__()
        self.num_heads, self.dk, self.dv = H, D // H, 2 * D // H
        self.q_proj, self.k_proj = nn.Linear(D, D), nn.Linear(D, D)
        self.v_proj, self.o_proj = nn.Linear(D, 2 * D), nn.Linear(2 * D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k = (p(x).view(b, n, H, self.dk).transpose(1, 2) for p in (self.q_proj, self.k_proj))
        v = self.v_proj(x).view(b, n, H, self.dv).transpose(1, 2)
        return self.o_proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, -1))


def test_wider_value_heads_are_split_by_the_same_heads_not_called_grouped_query() -> None:
    # v with more rows than q was called grouped-query attention, and k and v were left out
    torch.manual_seed(0)
    model, x = Holder(WideValueHeads()), _tokens()
    hl.attach(model, hl.HeartLoRAConfig(targets=("q", "k", "v", "o"), rank=4), example_input=x)
    layer = hl.attention_layers(model)[0]
    assert set(layer.projections) == {"q", "k", "v", "o"} and not hl.coverage(model).partial
    assert tuple(layer.projections["v"].index.shape) == (H, 2 * D // H)
    assert row_checks(model, x) == {"attn": {"qk": "ok", "v": "ok", "vo": "ok"}}
