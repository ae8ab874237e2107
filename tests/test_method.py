"""The method's maths on tiny random models of every supported attention family."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
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


@pytest.mark.parametrize("target", ["q", "k", "v", "o"])
def test_nonzero_head_changes_exactly_its_slice(family: str, target: str) -> None:
    """One head's nonzero share changes exactly that head's rows of the Linear's output (q, k, v), or reads
    exactly that head's input columns (o); every other row (column) stays bit for bit the base layer's."""
    model, x = make_family(family)
    hl.attach(model, ALL)
    layer = hl.attention_layers(model)[0]
    proj = layer.projections[target]
    h = layer.num_heads - 1
    with torch.no_grad():
        proj.lora_A.normal_()
        proj.lora_B.normal_()
        block = proj.head_weights(h).clone()
        proj.per_head.zero_()
        proj.head_weights(h).copy_(block)
    wrapper = next(w for w in model.modules() if isinstance(w, HeadLoRALinear) and proj in w.lora.values())
    seen: dict[str, torch.Tensor] = {}
    wrapper.register_forward_hook(lambda m, i, o: seen.update(adapted=o.detach(), base=m.base_layer(i[0]).detach()))
    model(x)
    changed = (seen["adapted"] != seen["base"]).reshape(-1, seen["base"].shape[-1]).any(0)
    if target == "o":
        delta = proj.delta_weight()
        nonzero_cols = delta.ne(0).any(0).nonzero().flatten()
        assert torch.equal(nonzero_cols, proj.index[h].sort().values)
        assert changed.any()
    else:
        assert torch.equal(changed.nonzero().flatten(), proj.index[h].sort().values)


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


def test_merged_adapters_cannot_be_disabled_nor_disabled_ones_merged() -> None:
    """Disabling a merged model used to leave the deltas in its weights (the output stayed the adapted one)."""
    model, x = make_family("timm_vit")
    base = model(x)
    with pytest.raises(ConfigError, match="no heartlora adapters"):
        hl.merge(model)
    hl.attach(model, ALL)
    randomize(model)
    hl.merge(model)
    with pytest.raises(ConfigError, match="merged into the base weights.*unmerge"):
        hl.set_adapters_enabled(model, False)
    hl.unmerge(model)
    hl.set_adapters_enabled(model, False)
    with pytest.raises(ConfigError, match="adapters are disabled"):
        hl.merge(model)
    assert torch.equal(model(x), base)


def test_switching_heads_off_refuses_a_merged_model_a_foreign_optimizer_and_bad_counts() -> None:
    """Each used to be accepted: heads "off" on a merged model kept their deltas in the weights (the output still
    changed), an optimizer without the adapter Parameters silently stopped training the heads that stay, and a
    fractional ne or a string head index were tracebacks. Every refusal leaves the model as it was."""
    model, x = make_family("timm_vit")
    hl.attach(model, ALL)
    randomize(model)
    layer = hl.attention_layers(model)[0].name
    before = {k: v.clone() for k, v in model.state_dict().items()}
    hl.merge(model)
    with pytest.raises(ConfigError, match="merged into the base weights.*unmerge"):
        hl.deactivate_heads(model, heads=[(layer, 0)])
    hl.unmerge(model)
    other = torch.optim.AdamW([nn.Parameter(torch.zeros(3))])
    with pytest.raises(ConfigError, match="holds none of this model's adapter parameters"):
        hl.deactivate_heads(model, heads=[(layer, 0)], optimizer=other)
    scores = {n.name: torch.arange(n.num_heads, dtype=torch.float64) for n in hl.attention_layers(model)}
    for ne in (2.5, "3", True):
        with pytest.raises(ConfigError, match="whole number of heads"):
            hl.deactivate_heads(model, scores, ne=ne)
    with pytest.raises(ConfigError, match="head index must be a whole number"):
        hl.deactivate_heads(model, heads=[(layer, "0")])
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    mine = torch.optim.AdamW(hl.adapter_parameters(model))
    assert hl.deactivate_heads(model, heads=[(layer, 0)], optimizer=mine) == [(layer, 0)]


def test_a_tracker_is_built_when_the_first_layer_has_every_head_off() -> None:
    model, x = make_family("timm_vit")
    hl.attach(model, hl.HeartLoRAConfig(targets=("q", "v"), rank=4))
    first = hl.attention_layers(model)[0]
    hl.deactivate_heads(model, heads=[(first.name, h) for h in range(first.num_heads)])
    tracker = hl.ResponsivenessTracker(model)
    model(x).sum().backward()
    tracker.update()
    assert tracker.scores()[first.name].abs().sum() == 0


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
    rows, other = proj.index[1], proj.index[0]
    assert torch.equal(seen["adapted"][..., rows], seen["base"][..., rows])
    assert not torch.equal(seen["adapted"][..., other], seen["base"][..., other])


def test_off_head_of_o_contributes_nothing() -> None:
    model, _ = make_family("hf_dinov2")
    hl.attach(model, ALL)
    randomize(model)
    layer = hl.attention_layers(model)[0]
    hl.deactivate_heads(model, heads=[(layer.name, 2)])
    o = layer.projections["o"]
    delta = o.delta_weight()
    assert torch.equal(o.index[2], torch.arange(16, 24))
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
    # q and v of that layer lose both factors: no head uses them any more
    assert len(opt.state) == n_before - 4
    assert sum(len(g["params"]) for g in opt.param_groups) == n_before - 4
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
    for target, proj in layer.projections.items():
        w = next(w for w in wrappers if proj in w.lora.values())
        delta, grad = proj.delta_weight(), w.base_layer.weight.grad
        products = proj.head_products()
        for h in range(layer.num_heads):
            sl = (slice(None), proj.index[h]) if target == "o" else (proj.index[h], slice(None))
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
                saved[proj] = proj.head_weights(h).detach().clone()
                proj.head_weights(h).zero_()
            changed = _loss(model, x) - loss.detach()
            for proj, val in saved.items():
                proj.head_weights(h).copy_(val)
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


def test_switching_heads_off_carries_the_optimizer_state_of_the_heads_that_stay() -> None:
    model, x = make_family("hf_vit")
    hl.attach(model, hl.HeartLoRAConfig(targets=("q", "o"), rank=4))
    randomize(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for _ in range(2):
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    layer = hl.attention_layers(model)[0]
    q, o = layer.projections["q"], layer.projections["o"]
    before = {t: (p.per_head.detach().clone(), {k: v.clone() for k, v in opt.state[p.per_head].items()})
              for t, p in (("q", q), ("o", o))}
    hl.deactivate_heads(model, heads=[(layer.name, 1)], optimizer=opt)
    d = layer.head_dim
    keep = torch.cat([torch.arange(0, d), torch.arange(2 * d, 4 * d)])  # heads 0, 2, 3 of the old factor
    for t, proj, dim in (("q", q, 0), ("o", o, 1)):
        weights, state = before[t]
        assert proj.per_head.shape[dim] == 3 * d
        assert torch.equal(proj.per_head.detach(), weights.index_select(dim, keep))
        new_state = opt.state[proj.per_head]
        assert torch.equal(new_state["exp_avg"], state["exp_avg"].index_select(dim, keep))
        assert torch.equal(new_state["exp_avg_sq"], state["exp_avg_sq"].index_select(dim, keep))
        assert torch.equal(new_state["step"], state["step"])
        assert any(p is proj.per_head for g in opt.param_groups for p in g["params"])
    assert len(opt.state) == sum(len(g["params"]) for g in opt.param_groups)
    model(x).pow(2).mean().backward()
    opt.step()  # the rebuilt Parameters train on with their carried state


def _saved_and_loaded_one_bit(tmp_path) -> tuple[nn.Module, torch.Tensor]:  # noqa: ANN001
    """A random 1-bit adapter on a tiny timm ViT, saved and loaded into a fresh backbone."""
    model, x = make_family("timm_vit")
    hl.attach(model, hl.HeartLoRAConfig(targets=("q", "v"), rank=4, bits=1))
    randomize(model)
    hl.save_adapter(model, tmp_path / "a.safetensors")
    fresh, _ = make_family("timm_vit")
    return hl.load_adapter(fresh, tmp_path / "a.safetensors"), x


def test_a_loaded_one_bit_adapter_keeps_training_as_one_bit(tmp_path) -> None:
    loaded, x = _saved_and_loaded_one_bit(tmp_path)
    proj = hl.attention_layers(loaded)[0].projections["q"]
    stored = proj.lora_B.detach().clone()
    a, b = proj.effective_weights()
    assert torch.equal(b, stored)  # unchanged weights are used exactly as decoded
    opt = torch.optim.SGD(hl.adapter_parameters(loaded), lr=0.5)
    loaded.train()
    loaded(x).pow(2).mean().backward()
    opt.step()
    assert not torch.equal(proj.lora_B.detach(), stored)  # latent weights moved
    a, b = proj.effective_weights()
    assert b.unique().numel() <= 2 and a.unique().numel() <= 2  # the forward is 1-bit again


def test_weight_mode_equals_forward_mode_in_values_and_gradients() -> None:
    """Attention code that reads ``.weight`` and calls F.linear itself (timm EVA, BEiT) sees the same adapted
    projection as code that calls the module."""
    torch.manual_seed(0)
    base = nn.Linear(16, 48)
    x = torch.randn(5, 16)
    outs, grads = [], []
    for mode in ("forward", "weight"):
        torch.manual_seed(1)
        w = HeadLoRALinear(base, mode=mode)
        for t, off in (("q", 0), ("v", 32)):
            w.lora[t] = hl.HeadLoRAProjection(t, "l", off + torch.arange(16).view(4, 4), 16, 48, 2, 0.5, 32, 0.1)
        w.lora["q"].remove_heads([2])
        y = F.linear(x, w.weight, w.bias) if mode == "weight" else w(x)
        y.pow(2).sum().backward()
        outs.append(y.detach())
        grads.append([p.grad for p in w.lora.parameters()])
    assert torch.allclose(outs[0], outs[1], atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(*grads))


def test_a_loaded_one_bit_adapter_stays_as_decoded_through_writes_of_the_same_values(tmp_path) -> None:  # noqa: ANN001
    import copy

    loaded, x = _saved_and_loaded_one_bit(tmp_path)
    y = loaded(x)
    with torch.no_grad():
        for p in hl.adapter_parameters(loaded):
            p.copy_(p.clone())  # what DDP's broadcast or loading the same state does
    assert torch.equal(loaded(x), y)
    assert torch.equal(copy.deepcopy(loaded)(x), y)
    layer = hl.attention_layers(loaded)[0]
    hl.deactivate_heads(loaded, heads=[(layer.name, 0)])  # the rows that stay are still the decoded values
    proj = layer.projections["q"]
    assert torch.equal(proj.effective_weights()[1], proj.lora_B.detach())


def test_the_delta_follows_the_base_output_dtype_under_autocast() -> None:
    torch.manual_seed(0)
    for off in ([], [1]):
        proj = hl.HeadLoRAProjection("q", "l", torch.arange(16).view(4, 4), 16, 16, 2, 1.0, 32, 0.1)
        proj.remove_heads(off)
        y, x = torch.randn(5, 16), torch.randn(5, 16)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = proj.add_delta(y, x)
        assert out.dtype == torch.float32


def test_weight_mode_refuses_adapter_dropout() -> None:
    import timm

    model = timm.create_model("eva02_tiny_patch14_224", pretrained=False, img_size=28, depth=1, num_classes=3)
    with pytest.raises(ConfigError, match="dropout"):
        hl.attach(model, hl.HeartLoRAConfig(dropout=0.1))


def _overflow_setup(ema: float | None = None) -> tuple[nn.Module, hl.ResponsivenessTracker, dict]:
    """A tracker after one finite step, and the scores it holds then."""
    model, x = make_family("timm_vit")
    hl.attach(model, hl.HeartLoRAConfig(targets=("q", "v"), rank=4))
    randomize(model)
    tracker = hl.ResponsivenessTracker(model, ema=ema)
    _loss(model, x).backward()
    tracker.update()
    return model, tracker, {k: v.clone() for k, v in tracker.scores().items()}


@pytest.mark.parametrize("ema", [None, 0.5])
@pytest.mark.parametrize("where", ["every adapter", "one head"])
def test_an_overflowed_step_adds_nothing_to_the_scores(where: str, ema: float | None) -> None:
    """fp16 loss scaling skips a step with an inf anywhere: the whole step adds nothing, to no head of any layer
    (not only the heads whose own terms overflowed), and an EMA is not decayed by it."""
    model, tracker, before = _overflow_setup(ema)
    if where == "every adapter":
        for p in hl.adapter_parameters(model):
            p.grad.fill_(float("inf"))
    else:
        q = hl.attention_layers(model)[0].projections["q"]
        q.lora_B.grad[:q.head_dim].fill_(float("inf"))  # head 0 of the first layer only
    tracker.update()
    after = tracker.scores()
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_a_step_the_gradient_scaler_skips_adds_nothing() -> None:
    """An inf outside the adapters (the classifier) makes GradScaler skip the step: Precision.unscale returns its
    found-inf, and the tracker given it adds nothing, though every adapter gradient is finite."""
    from heartlora.engine.precision import Precision

    model, tracker, before = _overflow_setup()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    precision = Precision("fp16", torch.device("cpu"), torch.amp.GradScaler("cpu"))
    x = make_family("timm_vit")[1]
    precision.backward(_loss(model, x))  # a finite step first: not skipped
    assert int(precision.unscale(opt)) == 0
    precision.step(opt)
    model, tracker, before = _overflow_setup()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.zero_grad()
    precision.backward(_loss(model, x))
    model.head.weight.grad.fill_(float("inf"))
    found = precision.unscale(opt)
    assert found is not None and bool(found)
    tracker.update(skipped=found)
    after = tracker.scores()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert Precision("fp32", torch.device("cpu")).unscale(opt) is None


@pytest.mark.parametrize("mode, ema", [("abs_sum", None), ("sum_abs", None), ("abs_sum", 0.5)])
def test_finite_steps_score_as_a_plain_sum_or_ema_bit_for_bit(mode: str, ema: float | None) -> None:
    """The skip rule changes nothing on finite steps: the scores are bit for bit the sum (or EMA, its first step
    copied) of the per-step terms."""
    model, x = make_family("timm_vit")
    hl.attach(model, hl.HeartLoRAConfig(targets=("q", "v", "o"), rank=4))
    randomize(model)
    tracker = hl.ResponsivenessTracker(model, mode=mode, ema=ema)
    expected = None
    for seed in range(3):
        model.zero_grad()
        _loss(model, x + seed).backward()
        terms = tracker.step_scores()
        tracker.update()
        if expected is None:
            expected = [t.clone() for t in terms]
        elif ema is None:
            expected = [e.add_(t) for e, t in zip(expected, terms)]
        else:
            expected = [e.mul_(ema).add_(t, alpha=1.0 - ema) for e, t in zip(expected, terms)]
    got = tracker.scores()
    assert all(torch.equal(got[layer.name], e) for layer, e in zip(hl.attention_layers(model), expected))
    fresh = hl.ResponsivenessTracker(model, mode=mode, ema=ema)
    fresh.load_state_dict(tracker.state_dict())  # a resumed warmup goes on as the one that was not stopped
    for t in (tracker, fresh):
        t.update()
    assert all(torch.equal(a, b) for a, b in zip(tracker.scores().values(), fresh.scores().values()))


@pytest.mark.parametrize("targets, bits", [(("q", "v"), 32), (("q", "k", "v"), 32), (("q", "v"), 1)])
def test_shared_product_of_a_fused_linear_equals_one_delta_per_projection(targets: tuple[str, ...], bits: int) -> None:
    """q and v (or q, k, v) of a fused qkv Linear run as one product (A stacked, B block-diagonal): the output and
    every gradient equal those of adding each projection's delta on its own, with heads off in a scattered pattern."""
    model, x = make_family("timm_vit")
    hl.attach(model, hl.HeartLoRAConfig(targets=targets, rank=4, bits=bits, scale=1.0))  # tolerances set at scale 1
    randomize(model)
    layer = hl.attention_layers(model)[0]
    hl.deactivate_heads(model, heads=[(layer.name, 0), (layer.name, 3)])
    linear = next(m for m in model.modules() if isinstance(m, HeadLoRALinear) and len(m.lora) == len(targets))
    inp = torch.randn(2, 5, linear.in_features, requires_grad=True)

    def run(shared: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        for p in [inp, *linear.parameters()]:
            p.grad = None
        if shared:
            out = linear(inp)
        else:
            y = linear.base_layer(inp).reshape(-1, linear.out_features)
            for proj in linear.lora.values():
                y = proj.add_delta(y, inp.reshape(-1, linear.in_features))
            out = y.view(2, 5, -1)
        out.square().sum().backward()
        return out.detach(), [inp.grad.clone()] + [p.grad.clone() for p in linear.lora.parameters()]

    out, grads = run(True)
    ref, ref_grads = run(False)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("field, value, match", [
    ("scale", 0, "scale 0 must be a finite number > 0"),
    ("scale", float("nan"), "scale nan must be"),
    ("rank", 2.5, "rank 2.5 must be a positive integer"),
    ("rank", True, "rank True must be a positive integer"),
    ("bits", 1.5, "bits 1.5 is not supported"),
])
def test_config_refuses_values_that_used_to_fail_later_or_silently(field: str, value: object, match: str) -> None:
    """scale 0 made attach blame the backbone (no delta reaches the output); rank 2.5 failed inside torch.empty."""
    with pytest.raises(ConfigError, match=match):
        hl.HeartLoRAConfig(**{field: value})


def test_attach_names_a_wrong_model_or_config_and_takes_a_dict(tmp_path) -> None:
    with pytest.raises(ConfigError, match="attach needs a torch.nn.Module .* got str"):
        hl.attach("vit", hl.HeartLoRAConfig())
    with pytest.raises(ConfigError, match="config must be a HeartLoRAConfig .* got int"):
        hl.attach(make_family("timm_vit")[0], 4)
    model = hl.attach(make_family("timm_vit")[0], {"rank": 2, "targets": "q,v"})
    assert hl.adapter_config(model).rank == 2 and hl.adapter_config(model).targets == ("q", "v")
    with pytest.raises(ConfigError, match="is a folder: name the file to write"):
        hl.save_adapter(model, tmp_path)


def test_a_merged_models_state_dict_is_the_unmerged_one_and_loads_into_either() -> None:
    from heartlora.method.model import wrappers

    # it held base + delta and the factors: loaded into an adapted model, the delta counted twice ("All keys matched")
    model, x = make_family("timm_vit")
    hl.attach(model, ALL)
    randomize(model)
    with torch.no_grad():
        y = model(x)
    plain = {k: v.clone() for k, v in model.state_dict().items()}
    hl.merge(model)
    merged = model.state_dict()
    assert merged.keys() == plain.keys() and all(torch.equal(merged[k], plain[k]) for k in plain)
    for into_merged in (False, True):
        other, _ = make_family("timm_vit")
        hl.attach(other, ALL)
        if into_merged:  # a load into a merged model lands on its unmerged weights and merges them again
            hl.merge(other)
        other.load_state_dict(merged)
        with torch.no_grad():
            assert torch.allclose(other(x), y, atol=1e-5, rtol=1e-4)
        assert all(w.merged == into_merged for w in wrappers(other))
        hl.unmerge(other)
        assert all(torch.equal(v, plain[k]) for k, v in other.state_dict().items())


def test_training_a_merged_model_is_refused() -> None:
    # its adapters got no gradient: a training step was a silent no-op (and every head scored 0)
    from heartlora.method.model import wrappers

    model, x = make_family("timm_vit")  # in eval mode
    hl.attach(model, ALL)
    assert not any(m.training for w in wrappers(model) for m in w.modules())  # its new wrappers too (they trained)
    hl.merge(model)
    model.train()
    with pytest.raises(ConfigError, match="merged into the weights.*unmerge"):
        model(x)
    model.eval()  # inference, even with gradients enabled, is what merging is for
    assert model(x).shape[0] == x.shape[0]
    model.train()
    with torch.no_grad():
        model(x)
