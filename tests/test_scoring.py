"""The scoring budget (--score-steps, --score-restart), the ranking stability metrics and ``inspect --compare``, on
the tiny random ViT of test_engine (6 layers × 2 heads, 96 training images: 3 steps an epoch at batch 32)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from test_engine import tiny

from heartlora.engine import TrainConfig, resolve, train
from heartlora.engine.checkpoint import load_checkpoint
from heartlora.engine.training_methods import HeadLoRA, register_method
from heartlora.errors import ConfigError


def _ckpt(out: Path) -> dict[str, Any]:
    return load_checkpoint(out / "checkpoint.pt")


def test_probe_switches_heads_off_after_exactly_n_steps(tmp_path: Path, task: str) -> None:
    # The warmup epoch has 3 steps; a 2-step probe must stop scoring after its second update.
    metrics = train(tiny(tmp_path, task, method="heart-lora", ne=3, score_steps=2))
    state = _ckpt(tmp_path)
    assert state["tracker"]["steps"] == 2
    assert metrics["heads_off_count"] == 3 and len(metrics["history"]) == 2
    assert json.loads(state["decisions"])["score_probe"] == {"steps": 2, "restart": False}
    full = train(tiny(tmp_path / "full", task, method="heart-lora", ne=3))
    assert _ckpt(tmp_path / "full")["tracker"]["steps"] == 3  # the whole warmup epoch, for contrast
    assert full["responsiveness"] != metrics["responsiveness"]


class _HeadsOffFromStart(HeadLoRA):
    """LoRA with a fixed set of heads off before the first step: what --score-restart should reproduce."""

    heads: list[tuple[str, int]] = []

    def prepare(self, model, cfg):  # type: ignore[no-untyped-def]
        from heartlora.method import deactivate_heads

        model, facts = super().prepare(model, cfg)
        deactivate_heads(model, heads=self.heads)
        return model, facts


def test_restart_equals_a_run_with_those_heads_off_from_step_zero(tmp_path: Path, task: str) -> None:
    probed = train(tiny(tmp_path / "probe", task, method="heart-lora", ne=4, score_steps=4, score_restart=True))
    off = [(name, h) for name, h in probed["heads_off"]]
    assert len(off) == 4 and len(probed["history"]) == 2  # the probe's partial epochs are not in the history
    assert _ckpt(tmp_path / "probe")["tracker"]["steps"] == 4
    method = register_method("test-heads-off-from-start", _HeadsOffFromStart("test"), replace=True)
    method.heads = off
    train(tiny(tmp_path / "fresh", task, method="test-heads-off-from-start"))
    a, b = _ckpt(tmp_path / "probe")["model"], _ckpt(tmp_path / "fresh")["model"]
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


def test_restart_survives_a_kill_after_the_probe(tmp_path: Path, task: str) -> None:
    kw = dict(method="heart-lora", ne=2, score_steps=2, score_restart=True, epochs=3)
    whole = train(tiny(tmp_path / "whole", task, **kw))
    assert train(tiny(tmp_path / "cut", task, stop_after_epoch=1, **kw))["status"] == "stopped"
    resumed = train(tiny(tmp_path / "cut", task, resume=True, epochs=3))
    assert resumed["heads_off"] == whole["heads_off"]
    a, b = _ckpt(tmp_path / "whole")["model"], _ckpt(tmp_path / "cut")["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


def test_random_control_switches_off_the_heads_its_seed_draws(tmp_path: Path, task: str) -> None:
    # --score-mode random: a seeded random ranking, whatever the training did (another learning rate, same seed:
    # same heads), another seed another draw; the heads off are exactly the lowest random scores.
    kw = dict(method="heart-lora", ne=4, score_mode="random")
    a = train(tiny(tmp_path / "a", task, **kw))
    b = train(tiny(tmp_path / "b", task, lr=1e-2, **kw))
    c = train(tiny(tmp_path / "c", task, seed=7, **kw))
    taylor = train(tiny(tmp_path / "taylor", task, method="heart-lora", ne=4))
    assert a["responsiveness"] == b["responsiveness"] and a["heads_off"] == b["heads_off"]
    assert a["final_train_loss"] != b["final_train_loss"]  # the two runs did train differently
    assert a["heads_off"] != c["heads_off"] and a["heads_off"] != taylor["heads_off"]
    ranked = sorted((s, name, h) for name, v in a["responsiveness"].items() for h, s in enumerate(v))
    assert {(name, h) for _, name, h in ranked[:4]} == {(name, h) for name, h in a["heads_off"]}
    assert _ckpt(tmp_path / "a")["tracker"]["steps"] == 3  # the warmup's steps are still counted


@pytest.mark.parametrize("kw, match", [
    (dict(method="lora", score_steps=3), "heart-"),
    (dict(method="heart-lora", score_steps=0), "at least 1"),
    (dict(method="heart-lora", score_restart=True), "give score_steps too"),
    (dict(method="lora", score_mode="random"), "random .* needs a heart-\\* method"),
    (dict(method="heart-lora", score_mode="random", score_ema=0.5), "no score_ema"),
])
def test_score_flags_refuse_nonsense(kw: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        resolve(TrainConfig(task="digits", **kw))


def test_probe_longer_than_the_run_is_refused(tmp_path: Path, task: str) -> None:
    with pytest.raises(ConfigError, match="more than the run's 6 optimizer steps"):
        train(tiny(tmp_path, task, method="heart-lora", ne=2, score_steps=7))


def test_a_short_probe_needs_a_fixed_count(tmp_path: Path, task: str) -> None:
    """--ne auto after a probe shorter than the warmup sees adapters near zero: every share passes, so it is refused
    before any training; a fixed count or share runs, and a probe as long as the warmup may keep --ne auto."""
    with pytest.raises(ConfigError, match="score_steps 2 with ne auto"):
        train(tiny(tmp_path / "auto", task, method="heart-lora", ne="auto", score_steps=2))
    assert not (tmp_path / "auto").exists()
    fixed = train(tiny(tmp_path / "fraction", task, method="heart-lora", ne_fraction=0.25, score_steps=2))
    assert fixed["heads_off_count"] == 3
    whole = train(tiny(tmp_path / "whole", task, method="heart-lora", ne="auto", score_steps=3))  # = the warmup
    assert whole["ne_choice"]["candidates"]


# -- stability metrics on hand-made rankings ------------------------------------------------------------------------
REF = {"l0": [1.0, 2.0, 3.0], "l1": [4.0, 5.0, 6.0]}


def test_kendall_and_spearman_on_known_rankings() -> None:
    from heartlora_bench.stability import kendall_tau, spearman

    assert kendall_tau(REF, REF) == pytest.approx(1.0)
    reversed_ = {"l0": [6.0, 5.0, 4.0], "l1": [3.0, 2.0, 1.0]}
    assert kendall_tau(REF, reversed_) == pytest.approx(-1.0)
    assert spearman(REF, reversed_) == pytest.approx(-1.0)
    # One adjacent swap among 6 items: 1 discordant pair of 15, τ = (14 - 1) / 15; ρ = 1 - 6·2 / (6·35).
    swapped = {"l0": [2.0, 1.0, 3.0], "l1": [4.0, 5.0, 6.0]}
    assert kendall_tau(REF, swapped) == pytest.approx(13 / 15)
    assert spearman(REF, swapped) == pytest.approx(1 - 12 / 210)
    # Scale does not matter, only the order.
    assert kendall_tau(REF, {k: [10 * x for x in v] for k, v in swapped.items()}) == pytest.approx(13 / 15)


def test_jaccard_of_switched_off_sets() -> None:
    from heartlora_bench.stability import compare, jaccard, switched_off

    assert switched_off(REF, 2) == {("l0", 0), ("l0", 1)}
    assert switched_off(REF, 2, scope="layer") == {("l0", 0), ("l0", 1), ("l1", 0), ("l1", 1)}
    other = {"l0": [1.0, 9.0, 3.0], "l1": [4.0, 0.5, 6.0]}  # its two lowest: (l1, 1) and (l0, 0)
    assert compare(REF, other, ne=2)["jaccard"] == pytest.approx(1 / 3)  # {l0:0} shared of {l0:0, l0:1, l1:1}
    assert compare(REF, other, ne=0)["jaccard"] == 1.0
    assert jaccard({1, 2}, {3}) == 0.0


def test_stability_curve_and_layout_check() -> None:
    from heartlora_bench.stability import doubling_steps, pairwise, stability_curve

    snaps = [(1, {"l0": [3.0, 2.0, 1.0], "l1": [6.0, 5.0, 4.0]}), (2, REF)]
    rows = stability_curve(snaps, REF, ne=3)
    assert [r["steps"] for r in rows] == [1, 2]
    assert rows[1]["kendall"] == pytest.approx(1.0) and rows[1]["jaccard"] == 1.0
    assert rows[0]["jaccard"] == 1.0 and rows[0]["kendall"] < 1.0  # same bottom three, different order
    assert doubling_steps(10) == [1, 2, 4, 8, 10] and doubling_steps(8) == [1, 2, 4, 8] and doubling_steps(1) == [1]
    assert [(r["a"], r["b"]) for r in pairwise({"x": REF, "y": REF, "z": REF}, ne=1)] == [
        ("x", "y"), ("x", "z"), ("y", "z")]
    with pytest.raises(ConfigError, match="different layers or head counts"):
        stability_curve([(1, {"l0": [1.0, 2.0]})], REF, ne=1)


def test_group_correlations_pool_pairs_of_different_seeds() -> None:
    import numpy as np

    from heartlora_bench.stability import group_correlations, normalised

    a1, a2 = {"l0": [1.0, 2.0], "l1": [3.0, 4.0]}, {"l0": [2.0, 4.0], "l1": [6.0, 8.0]}  # a2 = 2·a1: same shares
    b1 = {"l0": [1.0, 2.0], "l1": [4.0, 3.0]}
    c2 = {"l0": [4.0, 3.0], "l1": [2.0, 1.0]}  # a1 reversed
    shares = normalised(a1)
    assert shares["heads"] == pytest.approx([0.1, 0.2, 0.3, 0.4]) and shares["layers"] == pytest.approx([0.3, 0.7])
    groups = {"A": "natural", "B": "natural", "C": "structured"}
    out = group_correlations({("A", 1): a1, ("A", 2): a2, ("B", 1): b1, ("C", 2): c2}, groups.__getitem__)
    heads = out["heads"]
    # same task, other seed: identical shares; A1 vs B1 is the same seed, so never paired; C only as other group
    assert heads["same_task"] == {"mean": pytest.approx(1.0), "min": pytest.approx(1.0), "max": pytest.approx(1.0),
                                  "pairs": 1}
    r_ab = float(np.corrcoef([1, 2, 3, 4], [1, 2, 4, 3])[0, 1])  # A2 vs B1 (the only different-seed A–B pair)
    assert heads["same_group"]["mean"] == pytest.approx(r_ab) and heads["same_group"]["pairs"] == 1
    # A1 vs C2 (reversed: -1) and B1 vs C2; A2 vs C2 share seed 2
    r_bc = float(np.corrcoef([1, 2, 4, 3], [4, 3, 2, 1])[0, 1])
    assert heads["other_group"]["pairs"] == 2 and heads["other_group"]["mean"] == pytest.approx((-1 + r_bc) / 2)
    assert heads["other_group"]["min"] == pytest.approx(-1.0)
    assert out["heads"]["by_pair"]["A|C"] == pytest.approx(-1.0)
    assert out["layers"]["same_task"]["mean"] == pytest.approx(1.0)
    # regrouping the 3 tasks (a pair and a single) gives 3 partitions; the observed one, A and B together, has the
    # largest same-group minus other-group gap: r_ab − (r_ac + r_bc) / 2
    perm = heads["permutation"]
    assert perm["gap"] == pytest.approx(r_ab - (-1 + r_bc) / 2) and perm["regroupings"] == 3
    assert perm["p"] == pytest.approx(1 / 3)
    # two groups of two: 3 partitions, not 6 labelings (swapping the groups' names regroups nothing)
    d2 = {"l0": [1.0, 3.0], "l1": [2.0, 4.0]}
    four = {("A", 1): a1, ("B", 2): a1, ("C", 1): c2, ("D", 2): d2, ("A", 3): b1}
    groups4 = {"A": "natural", "B": "natural", "C": "structured", "D": "structured"}
    perm4 = group_correlations(four, groups4.__getitem__)["heads"]["permutation"]
    # by hand: the different-seed pairs are A1–B2, A3–B2 (A|B), A3–C1 (A|C), A1–D2, A3–D2 (A|D), B2–C1 (B|C),
    # C1–D2 (C|D); B|D is never paired (same seed). Each regrouping's gap is over the pairs it has.
    def r(x, y):
        return float(np.corrcoef(x, y)[0, 1])

    va, vb, vc, vd = [1, 2, 3, 4], [1, 2, 4, 3], [4, 3, 2, 1], [1, 3, 2, 4]
    pair_r = {"AB": (1.0 + r(vb, va)) / 2, "AC": r(vb, vc), "AD": (r(va, vd) + r(vb, vd)) / 2, "BC": r(va, vc),
              "CD": r(vc, vd)}

    def gap_of(same: set[str]) -> float:
        return (np.mean([v for k, v in pair_r.items() if k in same])
                - np.mean([v for k, v in pair_r.items() if k not in same]))

    gaps = [gap_of({"AB", "CD"}), gap_of({"AC"}), gap_of({"AD", "BC"})]  # the observed grouping first
    assert perm4["regroupings"] == 3 and perm4["gap"] == pytest.approx(gaps[0])
    assert perm4["p"] == pytest.approx(sum(g >= gaps[0] - 1e-12 for g in gaps) / 3)
    # a constant score vector has no correlation: its pairs are left out rather than poisoning the means with NaN
    flat = group_correlations({("A", 1): a1, ("A", 2): a2, ("B", 3): {"l0": [1.0, 1.0], "l1": [1.0, 1.0]}},
                              groups.__getitem__)["heads"]
    assert flat["same_task"]["pairs"] == 1 and flat["same_group"] is None and flat["permutation"] is None
    with pytest.raises(ConfigError, match="different layers or head counts"):
        group_correlations({("A", 1): a1, ("B", 2): {"l0": [1.0, 2.0, 3.0]}}, groups.__getitem__)
    with pytest.raises(ConfigError, match="all zero"):
        normalised({"l0": [0.0, 0.0]})


# -- inspect --compare ------------------------------------------------------------------------------------------------
def test_inspect_compare_two_runs(tmp_path: Path, task: str, capsys: pytest.CaptureFixture[str]) -> None:
    from heartlora.cli.main import main
    from heartlora_bench.stability import kendall_tau, spearman

    a = train(tiny(tmp_path / "a", task, method="heart-lora", ne=3, epochs=1, seed=1))
    b = train(tiny(tmp_path / "b", task, method="heart-lora", ne=3, epochs=1, seed=2))
    capsys.readouterr()
    assert main(["inspect", "--compare", str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "a"), "--json",
                 "--plot", str(tmp_path / "grid.png")]) == 0
    report = json.loads(capsys.readouterr().out.split("heatmap grid written")[0])
    ab, aa = report["pairs"][0], report["pairs"][1]
    assert (ab["a"], ab["b"], aa["b"]) == ("a", "b", "a'")
    assert ab["kendall"] == pytest.approx(kendall_tau(a["responsiveness"], b["responsiveness"]))
    assert ab["spearman"] == pytest.approx(spearman(a["responsiveness"], b["responsiveness"]))
    off_a, off_b = ({tuple(x) for x in m["heads_off"]} for m in (a, b))
    assert ab["jaccard_off"] == pytest.approx(len(off_a & off_b) / len(off_a | off_b))
    assert aa["kendall"] == pytest.approx(1.0) and aa["jaccard_off"] == 1.0
    assert (tmp_path / "grid.png").stat().st_size > 1000
    assert main(["inspect", "--compare", str(tmp_path / "a")]) == 2  # one file is not a comparison
    assert "at least two" in capsys.readouterr().err
