"""ne="auto": the choice is made on sampled training images (never val or test), recorded with its evidence, and
leaves the model."""

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
    passes = [c["passes"] for c in choice.candidates if not c["refine"]]
    assert passes[0] is True and False in passes  # at tolerance 0, switching off every head must cost something
    first_fail = passes.index(False)
    assert len(passes) == first_fail + 1  # no coarse share tried after it
    assert choice.candidates[first_fail]["increase"] > 0
    assert choice.fraction in (choice.candidates[first_fail - 1]["fraction"],
                               *(c["fraction"] for c in choice.candidates if c["refine"] and c["passes"]))
    assert choice.to_dict()["rule"].startswith("largest share")


def _fine_table(model, scores, batches) -> dict[float, float]:
    """Loss increase for switching off 1, 2, ..., 8 of the 8 heads (nested), every share judged."""
    fine = choose_ne(model, scores, batches, fractions=tuple(k / 8 for k in range(1, 9)), tolerance=1e9)
    return {c["fraction"]: c["increase"] for c in fine.candidates}


def test_a_failing_share_is_refined_halfway_and_the_refined_share_can_be_chosen() -> None:
    model, scores, batches = _setup()
    inc = _fine_table(model, scores, batches)
    # a coarse share b that fails at a tolerance its half b/2 (and 0) passes: the search must then take b/2
    b = next(b for b in (0.25, 0.5, 0.75, 1.0) if inc[b] > max(inc[b / 2], 0.0))
    base = choose_ne(model, scores, batches, fractions=(b,), tolerance=1e9).candidates[0]["loss"]
    tol = (max(inc[b / 2], 0.0) + inc[b]) / 2 / base  # midway: rounding on either side cannot flip a verdict
    choice = choose_ne(model, scores, batches, fractions=(b,), tolerance=tol, refine=True)
    assert [(c["fraction"], c["passes"], c["refine"]) for c in choice.candidates] == [
        (0.0, True, False), (b, False, False), (b / 2, True, True)]
    assert choice.fraction == b / 2 and choice.ne == choice.candidates[2]["heads_off"] == round(8 * b / 2)
    # the refined share's loss is that of a model with exactly its heads off
    ref = copy.deepcopy(model)
    hl.deactivate_heads(ref, scores, fraction=b / 2)
    ref.eval()
    with torch.no_grad():
        loss = torch.cat([F.cross_entropy(ref(x), y, reduction="none") for x, y in batches]).double().mean()
    assert choice.candidates[2]["loss"] == pytest.approx(float(loss), rel=1e-6)
    assert choice.candidates[2]["increase"] == pytest.approx(inc[b / 2], abs=1e-9)
    assert "halfway" in choice.rule
    # without refinement the same coarse table ends at the last coarse pass
    coarse = choose_ne(model, scores, batches, fractions=(b,), tolerance=tol, refine=False)
    assert coarse.candidates == choice.candidates[:2] and coarse.fraction == 0.0 and "halfway" not in coarse.rule


def test_refinement_is_skipped_when_the_halfway_share_adds_no_head() -> None:
    model, scores, batches = _setup()
    # per layer, 4 heads: at tolerance 0 the first share (1 head a layer) fails; halfway to 0 (1/8 of 4 heads) is
    # no head at all, so there is nothing more to try and every head stays
    choice = choose_ne(model, scores, batches, fractions=(0.25, 0.5), scope="layer", tolerance=0.0, refine=True)
    assert [(c["fraction"], c["passes"], c["refine"]) for c in choice.candidates] == [
        (0.0, True, False), (0.25, False, False)]
    assert choice.ne == 0 and choice.fraction == 0.0
    # a first share of 2 heads a layer that fails: halfway is 1 head a layer, which is tried (and recorded)
    wide = choose_ne(model, scores, batches, fractions=(0.5,), scope="layer", tolerance=0.0, refine=True)
    assert [(c["fraction"], c["heads_off"], c["ne"], c["refine"]) for c in wide.candidates] == [
        (0.0, 0, 0, False), (0.5, 4, 2, False), (0.25, 2, 1, True)]
    assert wide.ne == (1 if wide.candidates[2]["passes"] else 0)


def test_layer_scope_reports_the_count_each_layer_really_lost() -> None:
    """Swin's layers of 2 and 4 heads at scope layer: a share takes floor(share x each layer's own heads), so ne is
    one count only where every layer lost that many (else None, the share saying what was done), never the count of
    the largest layer; score_and_prune reports the same."""
    from heartlora.integrations.peft import score_and_prune

    model, x = make_family("timm_swin")
    hl.attach(model, hl.HeartLoRAConfig(targets=("q", "v"), rank=4))
    sizes = [layer.num_heads for layer in hl.attention_layers(model)]
    assert sizes == [2, 4]
    g = torch.Generator().manual_seed(0)
    scores = {layer.name: torch.rand(layer.num_heads, generator=g, dtype=torch.float64)
              for layer in hl.attention_layers(model)}
    batches = [(torch.rand(4, 3, 32, 32, generator=g), torch.randint(0, 5, (4,), generator=g))]
    choice = choose_ne(model, scores, batches, fractions=(1 / 6, 1 / 3, 1 / 2, 2 / 3), scope="layer",
                       tolerance=1e9, refine=False)
    for c in choice.candidates:
        off = hl.select_heads(scores, fraction=c["fraction"], scope="layer")
        lost = {n: sum(1 for m, _ in off if m == n) for n in scores}
        assert c["heads_off"] == len(off)
        assert c["ne"] == (lost[next(iter(lost))] if len(set(lost.values())) == 1 else None), (c, lost)
    # 0 and 1/6: no head of either layer; 1/3: 0 of 2 and 1 of 4; 1/2 and 2/3: 1 of 2 and 2 of 4 (was reported 2)
    assert [c["ne"] for c in choice.candidates] == [0, 0, None, None, None]
    assert choice.fraction == 2 / 3 and choice.ne is None and choice.to_dict()["ne"] is None
    pruned = score_and_prune(copy.deepcopy(model), batches, ne="auto", heldout=batches, scope="layer",
                             tolerance=1e9)
    assert pruned["ne"] is None and pruned["ne_choice"]["ne"] is None and len(pruned["heads_off"]) == 3
    uniform, _, vit_batches = _setup()  # layers of equal head counts report ne as before
    vit_scores = {layer.name: torch.rand(4, generator=g, dtype=torch.float64)
                  for layer in hl.attention_layers(uniform)}
    even = choose_ne(uniform, vit_scores, vit_batches, fractions=(0.25, 0.5), scope="layer", tolerance=1e9)
    assert [c["ne"] for c in even.candidates] == [0, 1, 2] and even.ne == 2


def test_bad_settings_are_refused() -> None:
    model, scores, batches = _setup()
    with pytest.raises(ConfigError):
        choose_ne(model, scores, batches, tolerance=-1.0)
    with pytest.raises(ConfigError):
        choose_ne(model, scores, batches, fractions=(0.5, 2.0))
    with pytest.raises(ConfigError):
        choose_ne(model, scores, [])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_loss_that_is_not_finite_is_one_line_not_a_choice(bad: float) -> None:
    # a diverged warmup: every share's increase compares with NaN (never passes), and refining read a row that did
    # not exist (IndexError); with refine off it chose ne 0 as if nothing were wrong
    model, scores, batches = _setup()
    with torch.no_grad():
        model.head.bias.fill_(bad)
    for refine in (True, False):
        with pytest.raises(ConfigError, match="diverged") as info:
            choose_ne(model, scores, batches, fractions=(0.25, 0.5), refine=refine)
        assert "\n" not in str(info.value)
