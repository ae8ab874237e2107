"""ne="auto": the choice is made on sampled training images (never val or test), recorded with its evidence, and leaves the model."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import make_family

import heartlora.method as hl
from heartlora.errors import ConfigError
from heartlora.method.auto_ne import choose_ne


def _setup() -> tuple[torch.nn.Module, dict[str, torch.Tensor], list[tuple[torch.Tensor, torch.Tensor]]]:
    model, _ = make_family("timm_vit")
    hl.attach(model, hl.HeartLoRAConfig(targets=("q", "v"), rank=4))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in hl.adapter_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    scores = {layer.name: torch.rand(layer.num_heads, generator=g, dtype=torch.float64)
              for layer in hl.attention_layers(model)}
    batches = [(torch.randn(6, 3, 32, 32, generator=g), torch.randint(0, 5, (6,), generator=g)) for _ in range(2)]
    return model, scores, batches


def test_candidates_are_nested_and_their_losses_are_those_of_the_switched_off_model() -> None:
    model, scores, batches = _setup()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    choice = choose_ne(model, scores, batches, fractions=(0.25, 0.5, 1.0), tolerance=1e9)
    assert [c["fraction"] for c in choice.candidates] == [0.0, 0.25, 0.5, 1.0]
    assert [c["heads_off"] for c in choice.candidates] == [0, 2, 4, 8]  # 2 layers x 4 heads
    assert choice.ne == 8 and choice.fraction == 1.0  # every candidate passes an unbounded tolerance
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the model is left as it was
    assert all(hl.head_masks(model)[n] == [True] * 4 for n in scores)
    # the recorded loss at 0.5 is the mean cross-entropy of a model with exactly those heads off
    ref = copy.deepcopy(model)
    hl.deactivate_heads(ref, scores, fraction=0.5)
    ref.eval()
    with torch.no_grad():
        loss = torch.cat([F.cross_entropy(ref(x), y, reduction="none") for x, y in batches]).double().mean()
    assert choice.candidates[2]["loss"] == pytest.approx(float(loss), rel=1e-6)
    assert choice.images == 12


def test_the_first_failing_candidate_stops_the_search() -> None:
    model, scores, batches = _setup()
    choice = choose_ne(model, scores, batches, fractions=(0.25, 0.5, 1.0), tolerance=0.0)
    passes = [c["passes"] for c in choice.candidates]
    assert passes[0] is True
    if False in passes:
        first_fail = passes.index(False)
        assert len(passes) == first_fail + 1  # nothing tried after it
        assert choice.candidates[first_fail]["increase"] > 0
        assert choice.fraction == choice.candidates[first_fail - 1]["fraction"]
    else:
        assert choice.fraction == 1.0
    assert choice.to_dict()["rule"].startswith("largest share")


def test_bad_settings_are_refused() -> None:
    model, scores, batches = _setup()
    with pytest.raises(ConfigError):
        choose_ne(model, scores, batches, tolerance=-1.0)
    with pytest.raises(ConfigError):
        choose_ne(model, scores, batches, fractions=(0.5, 2.0))
    with pytest.raises(ConfigError):
        choose_ne(model, scores, [])
