"""The method's maths on tiny random models of every supported attention family."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, make_family
from torch import nn

import heartlora.method as hl
from heartlora.errors import ConfigError, UnsupportedBackboneError
from heartlora.method.layer import HeadLoRALinear


def randomize(model: nn.Module, std: float = 0.1, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in hl.adapter_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * std)


ALL = hl.HeartLoRAConfig(targets=("q", "k", "v", "o"), rank=4)


def test_families_detected_with_their_layout(family: str) -> None:
    model, _ = make_family(family)
    hl.attach(model, ALL)
    layers = hl.attention_layers(model)
    assert len(layers) == 2
    assert {layer.layout for layer in layers} == {FAMILIES[family][2]}


def test_delta_is_exactly_zero_at_init(family: str) -> None:
    model, x = make_family(family)
    before = model(x)
    hl.attach(model, ALL)
    assert torch.equal(model(x), before)


def test_backbone_frozen_and_adapters_trainable(family: str) -> None:
    model, _ = make_family(family)
    hl.attach(model, ALL)
    adapter = {id(p) for p in hl.adapter_parameters(model)}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    head = {id(p) for p in model.head.parameters()} if hasattr(model, "head") else set()
    if not head:  # torchvision keeps its classifier in heads.head
        head = {id(p) for p in model.heads.parameters()}
    assert trainable == adapter | head


def test_merged_equals_unmerged_and_unmerge_is_exact(family: str) -> None:
    model, x = make_family(family)
    hl.attach(model, ALL)
    randomize(model)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    y = model(x)
    hl.merge(model)
    assert torch.allclose(model(x), y, atol=1e-5, rtol=1e-4)  # float32 re-association only
    hl.unmerge(model)
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())
    assert torch.equal(model(x), y)


def test_disabled_adapters_give_the_base_model() -> None:
    model, x = make_family("timm_vit")
    base = model(x)
    hl.attach(model, ALL)
    randomize(model)
    assert not torch.allclose(model(x), base)
    hl.set_adapters_enabled(model, False)
    assert torch.equal(model(x), base)


@pytest.mark.parametrize("target", ["q", "v"])
def test_off_head_leaves_its_slice_of_the_projection_identical(family: str, target: str) -> None:
    model, x = make_family(family)
    hl.attach(model, hl.HeartLoRAConfig(targets=("q", "v"), rank=4))
    randomize(model)
    layer = hl.attention_layers(model)[0]
    proj = layer.projections[target]
    hl.deactivate_heads(model, heads=[(layer.name, 1)])
    wrapper = next(w for w in model.modules() if isinstance(w, HeadLoRALinear) and proj in w.lora.values())
    seen: dict[str, torch.Tensor] = {}
    wrapper.register_forward_hook(lambda m, i, o: seen.update(adapted=o.detach(), base=m.base_layer(i[0]).detach()))
    model(x)
    d = layer.head_dim
    rows = slice(proj.offset + d, proj.offset + 2 * d)
    assert torch.equal(seen["adapted"][..., rows], seen["base"][..., rows])
    other = slice(proj.offset, proj.offset + d)
    assert not torch.equal(seen["adapted"][..., other], seen["base"][..., other])


def test_off_head_of_o_contributes_nothing() -> None:
    model, _ = make_family("hf_dinov2")
    hl.attach(model, ALL)
    randomize(model)
    layer = hl.attention_layers(model)[0]
    hl.deactivate_heads(model, heads=[(layer.name, 2)])
    o = layer.projections["o"]
    delta = o.delta_weight(32, 32)
    assert torch.count_nonzero(delta[:, 16:24]) == 0
    assert torch.count_nonzero(delta[:, :16]) > 0


def test_off_heads_leave_model_and_optimizer() -> None:
    model, x = make_family("timm_vit")
    hl.attach(model, hl.HeartLoRAConfig(targets=("q", "v"), rank=4))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model(x).sum().backward()
    opt.step()
    n_before = len(opt.state)
    name = hl.attention_layers(model)[0].name
    hl.deactivate_heads(model, heads=[(name, h) for h in range(4)], optimizer=opt)
    # 4 heads × (q, v) per-head B blocks, plus the two A matrices that no head uses any more
    assert len(opt.state) == n_before - 10
    assert sum(len(g["params"]) for g in opt.param_groups) == n_before - 10
    assert hl.head_masks(model)[name] == [False] * 4
    model(x).sum().backward()  # still trains
    opt.step()


def _loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x).pow(2).mean()


@pytest.mark.parametrize("family_name", ["hf_dinov2", "timm_vit"])
def test_taylor_identity_per_head(family_name: str) -> None:
    """Σ θ_h ⊙ ∂L/∂θ_h over a head's B rows (q, v) or A columns (o) = Σ ΔW_h ⊙ ∂L/∂ΔW_h."""
    model, x = make_family(family_name)
    model.double()
    hl.attach(model, ALL)
    randomize(model)
    wrappers = [w for w in model.modules() if isinstance(w, HeadLoRALinear)]
    for w in wrappers:
        w.base_layer.weight.requires_grad_(True)  # ∂L/∂W = ∂L/∂ΔW, since ΔW adds to W
    _loss(model, x.double() if x.is_floating_point() else x).backward()
    layer = hl.attention_layers(model)[0]
    d = layer.head_dim
    for target, proj in layer.projections.items():
        w = next(w for w in wrappers if proj in w.lora.values())
        delta, grad = proj.delta_weight(*w.base_layer.weight.shape), w.base_layer.weight.grad
        products = proj.head_products()
        for h in range(layer.num_heads):
            if target == "o":
                sl = (slice(None), slice(proj.offset + h * d, proj.offset + (h + 1) * d))
            else:
                sl = (slice(proj.offset + h * d, proj.offset + (h + 1) * d), slice(None))
            expected = (delta[sl] * grad[sl]).sum()
            assert torch.allclose(products[h].double(), expected, rtol=1e-6, atol=1e-12), (target, h)


def test_taylor_score_matches_finite_difference() -> None:
    """Zeroing head h's adapter changes the loss by ≈ -Σ θ·g (first order; θ small so the rest is O(θ²))."""
    model, x = make_family("timm_vit")
    model.double()
    hl.attach(model, hl.HeartLoRAConfig(targets=("q", "v", "o"), rank=4))
    randomize(model, std=1e-3)
    x = x.double()
    loss = _loss(model, x)
    loss.backward()
    layer = hl.attention_layers(model)[1]
    taylor = sum(p.head_products() for p in layer.projections.values())
    for h in range(layer.num_heads):
        saved = {}
        with torch.no_grad():
            for proj in layer.projections.values():
                saved[proj] = proj.heads[str(h)].detach().clone()
                proj.heads[str(h)].zero_()
            changed = _loss(model, x) - loss.detach()
            for proj, val in saved.items():
                proj.heads[str(h)].copy_(val)
        assert torch.allclose(changed, -taylor[h].double(), rtol=2e-2, atol=1e-12), (h, changed, taylor[h])


def test_tracker_modes_and_ema() -> None:
    model, x = make_family("timm_vit")
    hl.attach(model, hl.HeartLoRAConfig(targets=("q", "v"), rank=4))
    randomize(model)
    abs_sum, sum_abs = hl.ResponsivenessTracker(model), hl.ResponsivenessTracker(model, mode="sum_abs")
    ema = hl.ResponsivenessTracker(model, ema=0.5)
    per_step = []
    for seed in range(2):
        model.zero_grad()
        _loss(model, x + seed).backward()
        per_step.append(abs_sum.step_scores())
        for t in (abs_sum, sum_abs, ema):
            t.update()
    name = hl.attention_layers(model)[0].name
    total = per_step[0][0] + per_step[1][0]
    assert torch.allclose(abs_sum.scores()[name], total)
    assert torch.all(sum_abs.scores()[name] >= abs_sum.scores()[name] - 1e-12)  # |Σ| ≤ Σ||
    assert torch.allclose(ema.scores()[name], 0.5 * per_step[0][0] + 0.5 * per_step[1][0])
    state = abs_sum.state_dict()
    fresh = hl.ResponsivenessTracker(model)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.scores()[name], abs_sum.scores()[name])


SCORES = {"l0": torch.tensor([5.0, 1.0, 3.0, 9.0]), "l1": torch.tensor([0.5, 8.0, 7.0, 6.0]),
          "l2": torch.tensor([2.0, 4.0, 10.0, 11.0])}


def test_global_selection_ranks_all_heads_together() -> None:
    assert hl.select_heads(SCORES, ne=3) == [("l0", 1), ("l1", 0), ("l2", 0)]
    assert hl.select_heads(SCORES, ne=5) == [("l0", 1), ("l0", 2), ("l1", 0), ("l2", 0), ("l2", 1)]


def test_layer_selection_takes_ne_per_layer() -> None:
    assert hl.select_heads(SCORES, ne=1, scope="layer") == [("l0", 1), ("l1", 0), ("l2", 0)]
    assert hl.select_heads(SCORES, ne=2, scope="layer") == [("l0", 1), ("l0", 2), ("l1", 0), ("l1", 3), ("l2", 0),
                                                            ("l2", 1)]


def test_fraction_selection_with_uneven_head_counts() -> None:
    scores = {"a": torch.tensor([3.0, 1.0]), "b": torch.tensor([0.1, 2.0, 5.0, 4.0])}
    assert hl.select_heads(scores, fraction=0.5) == [("a", 1), ("b", 0), ("b", 1)]
    assert hl.select_heads(scores, fraction=0.5, scope="layer") == [("a", 1), ("b", 0), ("b", 1)]


def test_ne_above_head_count_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="ne=13 is more than the 12 active heads"):
        hl.select_heads(SCORES, ne=13)
    with pytest.raises(ConfigError, match="ne=5 .* per layer"):
        hl.select_heads(SCORES, ne=5, scope="layer")
    with pytest.raises(ConfigError, match="exactly one"):
        hl.select_heads(SCORES, ne=1, fraction=0.1)


def test_deactivate_on_a_model_counts_heads_already_off() -> None:
    model, _ = make_family("timm_vit")
    hl.attach(model, hl.HeartLoRAConfig(rank=4))
    names = [layer.name for layer in hl.attention_layers(model)]
    scores = {n: torch.arange(4, dtype=torch.float64) + 10 * i for i, n in enumerate(names)}
    assert hl.deactivate_heads(model, scores, ne=2) == [(names[0], 0), (names[0], 1)]
    assert hl.deactivate_heads(model, scores, ne=2) == [(names[0], 2), (names[0], 3)]
    with pytest.raises(ConfigError, match="more than the 4 active heads"):
        hl.deactivate_heads(model, scores, ne=5)


def test_unsupported_backbone_names_what_it_saw() -> None:
    class Attentionless(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.fc = nn.Linear(4, 2)

    with pytest.raises(UnsupportedBackboneError, match="no attention layer found in Attentionless"):
        hl.attach(Attentionless())


def test_bad_config_is_refused() -> None:
    with pytest.raises(ConfigError, match="targets"):
        hl.HeartLoRAConfig(targets=("q", "x"))
    with pytest.raises(ConfigError, match="bits"):
        hl.HeartLoRAConfig(bits=16)
    model, _ = make_family("timm_vit")
    hl.attach(model)
    with pytest.raises(ConfigError, match="already has heartlora adapters"):
        hl.attach(model)


def test_mha_replacement_matches_torch() -> None:
    from heartlora.method.layouts import LinearInProjMultiheadAttention
    torch.manual_seed(0)
    for batch_first in (True, False):
        mha = nn.MultiheadAttention(16, 4, batch_first=batch_first).eval()
        ours = LinearInProjMultiheadAttention(mha).eval()
        x = torch.randn(2, 5, 16) if batch_first else torch.randn(5, 2, 16)
        kpm = torch.tensor([[False] * 5, [False, False, False, True, True]])
        for kwargs in ({"need_weights": False}, {"need_weights": True}, {"key_padding_mask": kpm}):
            ref, ref_w = mha(x, x, x, **kwargs)
            out, w = ours(x, x, x, **kwargs)
            assert torch.allclose(out, ref, atol=1e-6)
            assert (w is None) == (ref_w is None) and (w is None or torch.allclose(w, ref_w, atol=1e-6))
        y = torch.randn(*x.shape)
        assert torch.allclose(ours(x, y, y)[0], mha(x, y, y)[0], atol=1e-6)


def test_swin_stages_with_different_head_counts_are_ranked_together() -> None:
    model, x = make_family("timm_swin")  # stage 1: 2 heads, stage 2: 4 heads
    hl.attach(model, hl.HeartLoRAConfig(rank=4))
    randomize(model)
    tracker = hl.ResponsivenessTracker(model)
    _loss(model, x).backward()
    tracker.update()
    scores = tracker.scores()
    assert [len(s) for s in scores.values()] == [2, 4]
    off = hl.deactivate_heads(model, scores, fraction=0.5)
    assert len(off) == 3
    assert sum(not on for mask in hl.head_masks(model).values() for on in mask) == 3
    model(x).sum().backward()


def test_mha_replacement_causal_matches_torch() -> None:
    from heartlora.method.layouts import LinearInProjMultiheadAttention
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=True).eval()
    ours = LinearInProjMultiheadAttention(mha).eval()
    x = torch.randn(2, 5, 16)
    causal = nn.Transformer.generate_square_subsequent_mask(5)
    ref = mha(x, x, x, attn_mask=causal, need_weights=False)[0]
    assert torch.allclose(ours(x, x, x, attn_mask=causal, need_weights=False)[0], ref, atol=1e-6)
    assert torch.allclose(ours(x, x, x, is_causal=True, need_weights=False)[0], ref, atol=1e-6)
