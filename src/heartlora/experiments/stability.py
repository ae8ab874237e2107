"""How stable a head ranking is: Kendall τ and Spearman ρ between two responsiveness score vectors, the Jaccard
overlap of the heads each would switch off, and a curve of snapshots (after 1, 2, 4, … steps) against a reference.

Scores are ``{layer name: per-head scores}`` as ``ResponsivenessTracker.scores()``, metrics.json and adapter files
hold them; two score sets compare only when they name the same layers with the same head counts.
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from heartlora.errors import ConfigError

Scores = Mapping[str, Sequence[float]]
Head = tuple[str, int]


def flatten(scores: Scores, like: Scores | None = None) -> np.ndarray:
    """The scores as one vector in layer order; with ``like``, refuse a different layout (layers or head counts)."""
    if like is not None:
        shape = [(n, len(v)) for n, v in scores.items()]
        other = [(n, len(v)) for n, v in like.items()]
        if shape != other:
            raise ConfigError("the two score sets have different layers or head counts (different backbones?): "
                              "compare rankings of the same model only")
    if not scores:
        raise ConfigError("no responsiveness scores to compare: the file or run has none (a non-adapter method?)")
    return np.concatenate([np.asarray([float(x) for x in v], dtype=float) for v in scores.values()])


def kendall_tau(a: Scores, b: Scores) -> float:
    """Kendall's τ-b between the two rankings of the same heads (1: same order, -1: reversed; NaN if one is
    constant)."""
    from scipy.stats import kendalltau

    return float(kendalltau(flatten(a), flatten(b, like=a)).statistic)


def spearman(a: Scores, b: Scores) -> float:
    """Spearman's ρ between the two rankings of the same heads."""
    from scipy.stats import spearmanr

    return float(spearmanr(flatten(a), flatten(b, like=a)).statistic)


def switched_off(scores: Scores, ne: int, scope: str = "global") -> set[Head]:
    """The heads ``ne`` would switch off under these scores (``heartlora.method.select_heads``' choice)."""
    import torch

    from heartlora.method import select_heads

    return set(select_heads({n: torch.as_tensor([float(x) for x in v]) for n, v in scores.items()}, ne=ne,
                            scope=scope))


def jaccard(a: set[Any], b: set[Any]) -> float:
    """|A ∩ B| / |A ∪ B|; two empty sets agree fully (1.0)."""
    return 1.0 if not a and not b else len(a & b) / len(a | b)


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


def heatmap_grid(path: Path, panels: Mapping[str, tuple[Scores, Mapping[str, Sequence[bool]]]], title: str = "") -> Path:
    """One layers × heads responsiveness panel per name (scores ÷ each panel's largest, × on heads switched off),
    side by side, saved to ``path``: which heads several tasks or seeds share."""
    import matplotlib
    from matplotlib.figure import Figure

    from heartlora._paths import atomic_path

    fig = Figure(figsize=(min(3.0 + 2.6 * len(panels), 24), 5.0), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="white")
    image = None
    for ax, (name, (scores, masks)) in zip(axes, panels.items()):
        width = max(len(v) for v in scores.values())
        grid = np.full((len(scores), width), np.nan)
        for i, row in enumerate(scores.values()):
            grid[i, :len(row)] = [float(x) for x in row]
        top = np.nanmax(grid)
        image = ax.imshow(np.ma.masked_invalid(grid / top if top > 0 else grid), aspect="auto", cmap=cmap,
                          vmin=0.0, vmax=1.0)
        for i, layer in enumerate(scores):
            for h, on in enumerate(masks.get(layer, ())):
                if not on:
                    ax.text(h, i, "×", ha="center", va="center", color="red", fontsize=9, fontweight="bold")
        ax.set_title("\n".join(line if len(line) <= 30 else "…" + line[-29:] for line in name.split("\n")),
                     fontsize=8)
        ax.set_xlabel("head")
    axes[0].set_ylabel("attention layer")
    if image is not None:
        fig.colorbar(image, ax=list(axes), fraction=0.02, pad=0.02)
    marked = any(not on for _, masks in panels.values() for row in masks.values() for on in row)
    fig.suptitle((f"{title}\nresponsiveness (÷ each panel's max)" + ("; × = switched off" if marked else "")).strip(),
                 fontsize=9)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    return path


__all__ = ["compare", "doubling_steps", "flatten", "group_correlations", "heatmap_grid", "jaccard", "kendall_tau",
           "normalised", "pairwise", "spearman", "stability_curve", "switched_off"]
