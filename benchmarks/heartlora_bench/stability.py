"""How stable a head ranking is, for the research scripts: the Jaccard overlap of the heads two rankings would
switch off, curves of snapshots (after 1, 2, 4, … steps) against a reference, and correlations pooled by task group.
The rank statistics themselves (Kendall τ, Spearman ρ) are the library's (``heartlora.engine.compare``).

Scores are ``{layer name: per-head scores}`` as ``ResponsivenessTracker.scores()``, metrics.json and adapter files
hold them; two score sets compare only when they name the same layers with the same head counts.
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from heartlora.engine.compare import flatten, jaccard, kendall_tau, spearman
from heartlora.engine.plots import heatmap_grid
from heartlora.errors import ConfigError

Scores = Mapping[str, Sequence[float]]
Head = tuple[str, int]


def switched_off(scores: Scores, ne: int, scope: str = "global") -> set[Head]:
    """The heads ``ne`` would switch off under these scores (``heartlora.method.select_heads``' choice)."""
    import torch

    from heartlora.method import select_heads

    return set(select_heads({n: torch.as_tensor([float(x) for x in v]) for n, v in scores.items()}, ne=ne,
                            scope=scope))




def compare(a: Scores, b: Scores, ne: int, scope: str = "global") -> dict[str, float]:
    """Kendall τ, Spearman ρ and the Jaccard overlap of the switched-off sets at ``ne``."""
    return {"kendall": kendall_tau(a, b), "spearman": spearman(a, b),
            "jaccard": jaccard(switched_off(a, ne, scope), switched_off(b, ne, scope))}


def stability_curve(snapshots: Sequence[tuple[int, Scores]], reference: Scores, ne: int,
                    scope: str = "global") -> list[dict[str, float]]:
    """Each (steps, scores) snapshot against ``reference`` (e.g. the full warmup's scores): one row per snapshot,
    ``{"steps", "kendall", "spearman", "jaccard"}``, in the snapshots' order."""
    return [{"steps": int(steps), **compare(scores, reference, ne, scope)} for steps, scores in snapshots]


def pairwise(named: Mapping[str, Scores], ne: int, scope: str = "global") -> list[dict[str, Any]]:
    """Every pair of named score sets compared: rows ``{"a", "b", "kendall", "spearman", "jaccard"}``."""
    return [{"a": x, "b": y, **compare(named[x], named[y], ne, scope)} for x, y in itertools.combinations(named, 2)]


def doubling_steps(total: int) -> list[int]:
    """1, 2, 4, … below ``total``, then ``total`` itself: where a scoring budget is measured."""
    if total < 1:
        raise ConfigError(f"the number of scoring steps must be at least 1, got {total}")
    steps = [2 ** i for i in range(total.bit_length()) if 2 ** i < total]
    return [*steps, total]


def normalised(scores: Scores) -> dict[str, np.ndarray]:
    """Per-head and per-layer responsiveness as shares of the run's total: ``{"heads": …, "layers": …}``, each
    summing to 1 (a run whose scores are all zero has no shares: ConfigError)."""
    flat = flatten(scores)
    total = float(flat.sum())
    if not total > 0:
        raise ConfigError("these responsiveness scores are all zero: nothing was scored (no optimizer step with a "
                          "nonzero gradient?)")
    layers = np.asarray([sum(float(x) for x in v) for v in scores.values()])
    return {"heads": flat / total, "layers": layers / total}


def group_correlations(runs: Mapping[tuple[str, int], Scores], group_of: Callable[[str], str]) -> dict[str, Any]:
    """Do responsiveness patterns differ by task group? Pearson r between runs ``(task, seed)`` of their normalised
    per-head and per-layer scores, pooled three ways: the same task under another seed (the noise floor a task
    difference has to stand out from), two tasks of one group, tasks of different groups. Only runs of different
    seeds are paired, so that a shared random init never makes two runs look alike. Per unit (``heads``, ``layers``):
    ``{"same_task" | "same_group" | "other_group": {"mean", "min", "max", "pairs"}, "by_pair": {"A|B": mean r},
    "permutation": {"gap", "p", "regroupings"}}`` (the last: how often regrouping the tasks at random, in groups of the
    same sizes, gives a same-group minus other-group gap at least as large, over the task pairs' mean r). A pair
    with a constant score vector has no correlation and is left out."""
    if len({tuple((n, len(v)) for n, v in s.items()) for s in runs.values()}) > 1:
        raise ConfigError("the runs' scores have different layers or head counts: compare runs of one backbone only")
    shares = {key: normalised(s) for key, s in runs.items()}
    out: dict[str, Any] = {}
    for unit in ("heads", "layers"):
        pools: dict[str, list[float]] = {"same_task": [], "same_group": [], "other_group": []}
        by_pair: dict[str, list[float]] = {}
        for (ta, sa), (tb, sb) in itertools.combinations(sorted(shares), 2):
            if sa == sb:
                continue
            x, y = shares[(ta, sa)][unit], shares[(tb, sb)][unit]
            if np.ptp(x) == 0 or np.ptp(y) == 0:  # a constant vector has no correlation: the pair says nothing
                continue
            r = float(np.corrcoef(x, y)[0, 1])
            kind = ("same_task" if ta == tb else "same_group" if group_of(ta) == group_of(tb) else "other_group")
            pools[kind].append(r)
            by_pair.setdefault("|".join(sorted((ta, tb))), []).append(r)
        out[unit] = {k: ({"mean": float(np.mean(v)), "min": float(np.min(v)), "max": float(np.max(v)),
                          "pairs": len(v)} if v else None) for k, v in pools.items()}
        out[unit]["by_pair"] = {k: float(np.mean(v)) for k, v in sorted(by_pair.items())}
        out[unit]["permutation"] = _group_permutation(by_pair, {t: group_of(t) for t, _ in shares})
    return out


def _group_permutation(by_pair: Mapping[str, list[float]], groups: Mapping[str, str],
                       limit: int = 100_000) -> dict[str, Any] | None:
    """How unusual the observed gap (mean r of same-group task pairs − mean r of other-group pairs) is among the
    regroupings of the tasks into groups of the same sizes: ``{"gap", "p", "regroupings"}``, p the share of
    regroupings whose gap is at least the observed one (the observed grouping included), so the smallest possible p
    is 1 / regroupings. A regrouping is a partition of the tasks (which group is called what does not matter). Up to
    ``limit`` they are all enumerated; beyond, ``limit`` random ones (seeded) are drawn and p = (1 + #≥) / (1 + n).
    None without a same-group and an other-group pair."""
    cross = {tuple(k.split("|")): float(np.mean(v)) for k, v in by_pair.items() if len(set(k.split("|"))) == 2}
    tasks = sorted(groups)

    def gap(part: Sequence[frozenset[str]]) -> float | None:
        of = {t: i for i, block in enumerate(part) for t in block}
        same = [r for (a, b), r in cross.items() if of[a] == of[b]]
        other = [r for (a, b), r in cross.items() if of[a] != of[b]]
        return float(np.mean(same) - np.mean(other)) if same and other else None

    sizes = sorted(collections.Counter(groups.values()).values(), reverse=True)
    observed_part = [frozenset(t for t in tasks if groups[t] == g) for g in sorted(set(groups.values()))]
    observed = gap(observed_part)
    if observed is None:
        return None

    def partitions(rest: tuple[str, ...], sizes: list[int]) -> Iterator[list[frozenset[str]]]:
        # the first remaining task always goes into the next block, so equal-size blocks are not counted twice
        if not sizes:
            yield []
            return
        seen_sizes = set()
        for k_i, k in enumerate(sizes):
            if k in seen_sizes:
                continue
            seen_sizes.add(k)
            others = sizes[:k_i] + sizes[k_i + 1:]
            for combo in itertools.combinations(rest[1:], k - 1):
                block = frozenset((rest[0], *combo))
                for tail in partitions(tuple(t for t in rest if t not in block), others):
                    yield [block, *tail]

    gaps = []
    for part in partitions(tuple(tasks), sizes):
        gaps.append(gap(part))
        if len(gaps) > limit:
            break
    if len(gaps) <= limit:
        gaps = [g for g in gaps if g is not None]
        return {"gap": observed, "p": sum(g >= observed - 1e-12 for g in gaps) / len(gaps), "regroupings": len(gaps)}
    rng = np.random.default_rng(0)
    drawn = []
    labels = [groups[t] for t in tasks]
    for _ in range(limit):
        perm = rng.permutation(labels)
        g = gap([frozenset(t for t, lab in zip(tasks, perm) if lab == name) for name in sorted(set(labels))])
        if g is not None:
            drawn.append(g)
    return {"gap": observed, "p": (1 + sum(g >= observed - 1e-12 for g in drawn)) / (1 + len(drawn)),
            "regroupings": len(drawn), "sampled": True}




__all__ = ["compare", "doubling_steps", "flatten", "group_correlations", "heatmap_grid", "jaccard", "kendall_tau",
           "normalised", "pairwise", "spearman", "stability_curve", "switched_off"]
