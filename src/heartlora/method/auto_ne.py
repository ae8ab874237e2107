"""Choosing how many heads to switch off (``ne="auto"``), from training data only.

After the warmup, the heads are ranked by responsiveness. For a few candidate counts (shares of all heads, nested:
each candidate switches off the next least responsive heads), a copy of the model with those heads switched off is
evaluated on a fixed sample of *training* images (images it has trained on; never validation or test data), and the
per-image loss is compared with the model that keeps every head, image by image. The choice is the largest candidate
whose mean loss increase stays within ``tolerance`` of the full model's loss; larger candidates are not tried once
one fails. With ``refine``, the share halfway between the failing one and the last that passed is then tried once
more, so that the step between candidates (12 of a ViT-S's 72 heads by default) does not decide alone (on by default:
benchmarks/ne_refine.py's val200 comparison, docs/research/sweeps/ne_refine.md). Cost: one forward pass over those
images per candidate, no training.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from heartlora.errors import ConfigError
from heartlora.method.deactivate import SCOPES, deactivate_heads, select_heads, share_count
from heartlora.method.model import attention_layers, evaluating

DEFAULT_FRACTIONS = (0.0, 1 / 6, 1 / 3, 1 / 2, 2 / 3)
# ne auto's tolerance, chosen on val200 over 0.05 at scale 1 and checked again at today's default scale 4 (74.8
# against 74.1 mean val200, docs/research/sweeps/defaults.md). The one definition: the CLI's help and the defaults
# read it.
DEFAULT_TOLERANCE = 0.02
# ne auto decides on this many sampled training images (one forward pass each per candidate share): heartlora train
# and heartlora prune take the same number.
HELDOUT_IMAGES = 256


@dataclass
class NeChoice:
    """The choice and the evidence: per candidate, the heads it switches off, the loss on those images and the mean
    per-image increase over keeping every head (with its standard error). ``ne`` is the count switched off (over all
    layers; in each layer with ``scope="layer"``), or None when layers of different head counts (Swin) lose
    different counts at ``scope="layer"``: each loses that share of its own heads, and ``fraction`` says so."""

    ne: int | None
    fraction: float
    scope: str
    rule: str
    images: int
    candidates: list[dict[str, float]]

    def to_dict(self) -> dict:
        """The choice and its evidence as plain data (metrics.json's ``ne_choice``)."""
        return asdict(self)


def _reduce(values: list[float]) -> list[float]:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        # NCCL reduces CUDA tensors only; gloo takes CPU ones
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t.tolist()
    return values


@torch.no_grad()
def _per_image_losses(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]],
                      forward: Callable[[nn.Module, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    if not batches:  # a rank whose shard of the sample is empty (fewer images than processes) still reduces
        return torch.zeros(0, dtype=torch.float64)
    with evaluating(model):
        return torch.cat([F.cross_entropy(forward(model, x).float(), y, reduction="none").double().cpu()
                          for x, y in batches])


def choose_ne(model: nn.Module, scores: dict[str, torch.Tensor], batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
              scope: str = "global", fractions: tuple[float, ...] = DEFAULT_FRACTIONS,
              tolerance: float = DEFAULT_TOLERANCE,
              forward: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None,
              refine: bool = True) -> NeChoice:
    """Pick ``ne`` for ``deactivate_heads(model, scores, ne=..., scope=...)`` (per layer when ``scope="layer"``).

    ``batches``: (images, labels) of sampled training data, already on the model's device and in the form the
    model takes. ``fractions``: candidate shares of the heads (of all heads, or of each layer's); 0 is always a
    candidate. A candidate passes when the mean per-image increase of the cross-entropy over the model with every
    head is at most ``tolerance`` × that model's mean loss; the search stops at the first that fails. ``refine``:
    then the share halfway between the failing one and the last that passed is tried too (when it switches off heads
    that neither does), and chosen if it passes. The model is not changed (candidates run on a copy). Under
    torch.distributed every rank passes its shard of the batches and gets the same answer."""
    if scope not in SCOPES:
        raise ConfigError(f"scope {scope!r} is unknown: choose global or layer")
    if tolerance < 0:
        raise ConfigError(f"tolerance {tolerance} must not be negative")
    fractions = tuple(sorted({0.0, *(float(f) for f in fractions)}))
    if fractions[-1] > 1.0:
        raise ConfigError(f"fractions {fractions} must be shares between 0 and 1")
    forward = forward or (lambda m, x: m(x))
    batches = list(batches)  # may be empty on a rank under torch.distributed: the images are counted over all
    layers = attention_layers(model)
    active = {layer.name: layer.head_mask() for layer in layers}
    base = _per_image_losses(model, batches, forward)
    n, base_sum = _reduce([float(base.numel()), float(base.sum())])
    if n == 0:
        raise ConfigError("choose_ne needs at least one batch of training images")
    base_mean = base_sum / n
    if not math.isfinite(base_mean):  # no share can be judged against it: training diverged before the choice
        raise ConfigError(f"cannot choose ne: the loss on the {int(n)} sampled training images is {base_mean} "
                          "with every head on, so training diverged during warmup (lower the learning rate, or "
                          "use --precision fp32 if it ran in fp16), or pass a fixed ne")
    work = copy.deepcopy(model)
    off: set[tuple[str, int]] = set()
    chosen = (0, 0.0)
    passed = 0  # heads the last passing share switches off
    table: list[dict[str, float]] = []
    counts = {len(m) for m in active.values()}

    def judge(f: float, wanted: list[tuple[str, int]], losses: torch.Tensor, refined: bool) -> bool:
        d = losses - base
        s, s2 = _reduce([float(d.sum()), float((d * d).sum())])
        mean = s / n
        se = math.sqrt(max(s2 / n - mean * mean, 0.0) / max(n - 1, 1))
        ok = mean <= tolerance * base_mean
        table.append({"fraction": f, "ne": ne_of(f, wanted), "heads_off": len(wanted), "loss": base_mean + mean,
                      "increase": mean, "stderr": se, "passes": ok, "refine": refined})
        return ok

    def ne_of(f: float, wanted: list[tuple[str, int]]) -> int | None:
        """The count select_heads took: of all heads, or in each layer (None when layers lose different counts)."""
        if scope == "global":
            return len(wanted)
        per_layer = {share_count(f, c) for c in counts}
        return per_layer.pop() if len(per_layer) == 1 else None

    failed: tuple[float, int] | None = None  # the first share that failed and how many heads it switches off
    for f in fractions:
        wanted = select_heads(scores, fraction=f, scope=scope, active=active)
        new = [h for h in wanted if h not in off]
        if new:
            deactivate_heads(work, heads=new)
            off.update(new)
        if not judge(f, wanted, base if not off else _per_image_losses(work, batches, forward), refined=False):
            failed = (f, len(wanted))
            break
        chosen, passed = (ne_of(f, wanted), f), len(wanted)
    del work
    if refine and failed is not None:
        mid = (chosen[1] + failed[0]) / 2
        wanted = select_heads(scores, fraction=mid, scope=scope, active=active)
        if passed < len(wanted) < failed[1]:  # heads that neither neighbour has: worth one more forward pass
            work = copy.deepcopy(model)
            deactivate_heads(work, heads=wanted)
            if judge(mid, wanted, _per_image_losses(work, batches, forward), refined=True):
                chosen = (ne_of(mid, wanted), mid)
            del work
    tried = ", ".join(f"{f:.3g}" for f in fractions)
    rule = (f"largest share of heads whose switch-off raises the mean cross-entropy on {int(n)} sampled training "
            f"images by at most {tolerance:g} x its value with every head ({base_mean:.4f}); shares tried in order "
            f"{tried}, stopping at the first that fails"
            + (", then the share halfway between it and the last that passed" if refine else ""))
    return NeChoice(ne=chosen[0], fraction=chosen[1], scope=scope, rule=rule, images=int(n), candidates=table)
