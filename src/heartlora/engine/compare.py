"""Comparing head rankings (``heartlora inspect --compare``): Kendall τ and Spearman ρ between two responsiveness
score sets, and the Jaccard overlap of the heads each switched off.

Scores are ``{layer name: per-head scores}`` as ``ResponsivenessTracker.scores()``, metrics.json and adapter files
hold them; two score sets compare only when they name the same layers with the same head counts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from heartlora.errors import ConfigError

Scores = Mapping[str, Sequence[float]]

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

def jaccard(a: set[Any], b: set[Any]) -> float:
    """|A ∩ B| / |A ∪ B|; two empty sets agree fully (1.0)."""
    return 1.0 if not a and not b else len(a & b) / len(a | b)


__all__ = ["Scores", "flatten", "jaccard", "kendall_tau", "spearman"]
