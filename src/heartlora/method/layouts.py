"""Where the heads are: one registry entry per attention family, each with its q, k, v row order stated.

An entry recognises an attention module and says, for each projection q, k, v, o, which ``nn.Linear`` computes it
and which of its rows (q, k, v) or input columns (o) belong to each head, as an index tensor of shape
(num_heads, head_dim). A fused Linear's row order is a property of the attention's source, not of its shapes, so
fused layouts match only the classes whose order has been read (``QKV_BLOCKS`` and friends below); an unknown class
with a fused q/k/v Linear is refused rather than guessed. Adding a family means adding its class here; the adapters,
the scorer and the trainer only ever see :class:`AttentionSites`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from heartlora.errors import UnsupportedBackboneError
from heartlora.method.layer import is_pointwise_conv

PROJECTIONS = ("q", "k", "v", "o")


def block_index(offset: int, num_heads: int, head_dim: int) -> torch.Tensor:
    """Rows ``offset + h·d + j``: head h's d rows in one contiguous block (q|k|v blocks, or a separate Linear)."""
    return offset + torch.arange(num_heads * head_dim).view(num_heads, head_dim)


def interleaved_index(num_heads: int, sizes: tuple[int, ...], slot: int) -> torch.Tensor:
    """Rows of ``slot`` when each head's rows hold its slots one after the other (head 0: q k v, head 1: q k v, …),
    slot s having ``sizes[s]`` rows per head (timm TinyViT, EfficientFormer, MaxViT ``rw``)."""
    per_head, start = sum(sizes), sum(sizes[:slot])
    return (torch.arange(num_heads)[:, None] * per_head + start + torch.arange(sizes[slot])[None, :])


@dataclass
class Site:
    """Projection lives in ``getattr(parent, attr)``, an ``nn.Linear``; ``index[h]`` are head h's output rows (q, k,
    v) or input columns (o). ``mode="weight"`` when the attention reads the Linear's ``.weight`` itself rather than
    calling it."""

    parent: nn.Module
    attr: str
    index: torch.Tensor
    mode: str = "forward"


@dataclass
class AttentionSites:
    """What a layout finds in one attention module: its heads, and for each of q, k, v, o it can reach the Linear
    (or 1×1 convolution) and the rows (or columns) that belong to each head; ``missing`` says why a projection
    is absent."""

    num_heads: int
    head_dim: int
    sites: dict[str, Site]  # keys among q, k, v, o
    missing: dict[str, str] = field(default_factory=dict)  # projection -> why this family has no Linear for it


@dataclass(frozen=True)
class HeadLayout:
    """An attention family. ``row_order`` says how q, k, v rows are laid out, in words. ``describe`` may replace the
    module in its parent first (``nn.MultiheadAttention`` keeps q, k, v in a bare Parameter, so it is swapped for an
    equivalent module with a Linear in-projection)."""

    name: str
    row_order: str
    matches: Callable[[nn.Module], bool]
    describe: Callable[[nn.Module, nn.Module, str], tuple[nn.Module, AttentionSites]]


LAYOUTS: list[HeadLayout] = []


def register_layout(layout: HeadLayout) -> HeadLayout:
    """Teach attach a new attention family: ``layout.matches`` picks its modules and ``layout.describe`` names the
    projections and each head's rows. Layouts are tried in registration order; returns the layout (so it can be
    used as a decorator's result)."""
    LAYOUTS.append(layout)
    return layout


def class_path(m: object) -> str:
    return f"{type(m).__module__}.{type(m).__qualname__}"


def _linear(m: nn.Module, attr: str) -> nn.Linear | None:
    child = getattr(m, attr, None)
    return child if isinstance(child, nn.Linear) else None


def _proj(m: nn.Module | None, attr: str) -> nn.Module | None:
    """``getattr(m, attr)`` when it is a projection heartlora can wrap: an nn.Linear or a 1×1 convolution."""
    child = getattr(m, attr, None)
    return child if isinstance(child, nn.Linear) or is_pointwise_conv(child) else None


def _rows(p: nn.Module) -> int:
    return p.out_features if isinstance(p, nn.Linear) else p.out_channels


def _cols(p: nn.Module) -> int:
    return p.in_features if isinstance(p, nn.Linear) else p.in_channels


def _num_heads(m: nn.Module) -> int | None:
    for attr in ("num_heads", "num_attention_heads", "heads"):
        n = getattr(m, attr, None)
        if isinstance(n, int) and not isinstance(n, bool) and n > 0:
            return n
    n = getattr(getattr(m, "config", None), "num_attention_heads", None)
    return n if isinstance(n, int) and n > 0 else None


def _split(total: int, parts: int, heads: int, what: str) -> int:
    if total % (parts * heads):
        raise UnsupportedBackboneError(f"{what} has {total} rows, not divisible into {parts} × {heads} heads: "
                                       "its row order is not the one heartlora expects; report the family")
    return total // (parts * heads)


def _o_site(m: nn.Module, names: tuple[str, ...], heads: int, parent: nn.Module | None = None) -> dict[str, Site]:
    parent = m if parent is None else parent
    for attr in names:
        lin = _proj(parent, attr)
        if lin is not None:
            return {"o": Site(parent, attr, block_index(0, heads, _split(_cols(lin), 1, heads, attr)))}
    return {}


# --- one fused Linear holding q|k|v (or k|v) as blocks, heads contiguous inside each block ----------------------
# Each class below computes ``qkv.reshape(B, N, 3, num_heads, head_dim)`` (or the equivalent permutation): q, k, v
# are blocks of rows, head-major inside. Read from timm 1.0's source.
QKV_BLOCKS = {
    "timm.layers.attention.Attention", "timm.layers.attention.AttentionRope", "timm.layers.attention.DiffAttention",
    "timm.models.swin_transformer.WindowAttention", "timm.models.cait.TalkingHeadAttn", "timm.models.convit.MHSA",
    "timm.models.xcit.XCA", "timm.models.volo.Attention", "timm.models.twins.LocallyGroupedAttn",
    "timm.models.gcvit.WindowAttentionGlobal", "timm.models.mvitv2.MultiScaleAttention",
    "timm.models.vision_transformer_sam.Attention", "timm.models.vision_transformer_relpos.RelPosAttention",
    "timm.models.coat.FactorAttnConvRelPosEnc", "timm.models.davit.WindowAttention",
    "timm.models.davit.ChannelAttention",
    "timm.models.nest.Attention", "timm.models.fastvit.Attention", "timm.models.maxxvit.AttentionCl",
    "timm.models.hiera.MaskUnitAttention", "timm.models.hieradet_sam2.MultiScaleAttention",
    "timm.models.swin_transformer_v2_cr.WindowMultiHeadAttention", "timm.models.metaformer.Attention",
    "timm.models.edgenext.CrossCovarianceAttn", "timm.models.eva.EvaAttention", "timm.models.beit.Attention",
    "timm.models.swin_transformer_v2.WindowAttention", "timm.models.vision_transformer.Attention",
    # the same on (B, C, H, W) maps with 1×1 convolutions: ``qkv(x).reshape(B, 3, num_heads, head_dim, -1)``
    "timm.models.maxxvit.Attention2d", "timm.models.visformer.Attention",
    # Hugging Face: ``qkv(x).reshape(B, N, 3, num_heads, head_dim)`` (BLIP, BLIP-2, InstructBLIP, ViTDet, SAM)
    "transformers.models.blip.modeling_blip.BlipAttention", "transformers.models.blip_2.modeling_blip_2.Blip2Attention",
    "transformers.models.instructblip.modeling_instructblip.InstructBlipAttention",
    "transformers.models.vitdet.modeling_vitdet.VitDetAttention",
    "transformers.models.sam.modeling_sam.SamVisionAttention",
    "transformers.models.sam.modeling_sam.SamVisionSdpaAttention",
}
# Per head, q k v one after the other: ``qkv.view(B, N, num_heads, -1).split([key_dim, key_dim, val_dim])``.
QKV_INTERLEAVED = {"timm.models.tiny_vit.Attention", "timm.models.efficientformer.Attention"}
# Classes whose ``head_first`` flag picks interleaved (True) or blocks (False).
QKV_HEAD_FIRST = {"timm.models.maxxvit.AttentionCl", "timm.models.maxxvit.Attention2d"}


# Classes whose attention output reaches ``proj`` as (…, head_dim, num_heads): head h's columns are j·H + h.
O_HEAD_LAST = {"timm.models.nest.Attention"}


def _weight_read(m: nn.Module) -> bool:
    """timm EVA, BEiT and SwinV2 with a q/v bias call ``F.linear(x, self.qkv.weight, cat(q_bias, k_bias, v_bias))``
    instead of ``self.qkv(x)``: the adapters must then act through the weight."""
    return getattr(m, "q_bias", None) is not None and not getattr(m, "qkv_bias_separate", False)


FUSED_O = ("proj", "projection")  # the output projection's name next to a fused qkv (BLIP: projection)


def _fused(m: nn.Module) -> bool:
    return _proj(m, "qkv") is not None and _num_heads(m) is not None and any(_proj(m, o) for o in FUSED_O)


def _blocks_matches(m: nn.Module) -> bool:
    path = class_path(m)
    if path in QKV_HEAD_FIRST and getattr(m, "head_first", True):
        return False
    return path in QKV_BLOCKS and _fused(m) and not _weight_read(m)


def _global_query(m: nn.Module) -> bool:
    # GCViT's global blocks: qkv holds k|v only; q is the stage's global query tokens, passed in.
    return class_path(m) == "timm.models.gcvit.WindowAttentionGlobal" and bool(getattr(m, "use_global", False))


def _blocks_describe(m: nn.Module, parent: nn.Module, attr: str) -> tuple[nn.Module, AttentionSites]:
    heads = _num_heads(m)
    slots = ("k", "v") if _global_query(m) else ("q", "k", "v")
    d = _split(_rows(m.qkv), len(slots), heads, f"{type(m).__name__}.qkv")
    mode = "weight" if _weight_read(m) else "forward"
    sites = {s: Site(m, "qkv", block_index(i * heads * d, heads, d), mode) for i, s in enumerate(slots)}
    sites.update(_o_site(m, FUSED_O, heads))
    if class_path(m) in O_HEAD_LAST:
        sites["o"].index = block_index(0, d, heads).t().contiguous()
    missing = {"q": "q is the global query tokens, computed outside this module"} if "q" not in slots else {}
    return m, AttentionSites(heads, d, sites, missing)


register_layout(HeadLayout("fused_qkv", "one Linear `qkv`: rows q | k | v (k | v in GCViT global blocks), heads "
                           "contiguous in each", _blocks_matches, _blocks_describe))
register_layout(HeadLayout(
    "fused_qkv_weight", "as fused_qkv; the attention reads `qkv.weight` with its own q/v bias (timm EVA, BEiT, SwinV2)",
    lambda m: class_path(m) in QKV_BLOCKS and _fused(m) and _weight_read(m), _blocks_describe))


def _interleaved_matches(m: nn.Module) -> bool:
    path = class_path(m)
    return _fused(m) and (path in QKV_INTERLEAVED or (path in QKV_HEAD_FIRST and bool(getattr(m, "head_first", 0))))


def _interleaved_describe(m: nn.Module, parent: nn.Module, attr: str) -> tuple[nn.Module, AttentionSites]:
    heads = _num_heads(m)
    if class_path(m) in QKV_HEAD_FIRST:
        d = _split(_rows(m.qkv), 3, heads, f"{type(m).__name__}.qkv")
        sizes = (d, d, d)
    else:
        sizes = (int(m.key_dim), int(m.key_dim), int(getattr(m, "val_dim", 0) or m.d))
    if sum(sizes) * heads != _rows(m.qkv):
        raise UnsupportedBackboneError(f"{type(m).__name__}.qkv has {_rows(m.qkv)} rows, not {heads} heads × "
                                       f"{sum(sizes)}: report the family")
    sites = {s: Site(m, "qkv", interleaved_index(heads, sizes, i)) for i, s in enumerate(("q", "k", "v"))}
    sites.update(_o_site(m, ("proj",), heads))
    return m, AttentionSites(heads, sizes[0], sites)


register_layout(HeadLayout("interleaved_qkv", "one Linear `qkv`: per head q k v one after the other (timm TinyViT, "
                           "EfficientFormer, MaxViT rw)", _interleaved_matches, _interleaved_describe))


# --- projections wrapped in a norm (a Linear or 1×1 conv followed by a per-channel BatchNorm, which keeps each row
#     on its head): timm LeViT (Linear or conv), EfficientFormerV2 ------------------------------------------------
# LeViT ``Attention``: ``qkv(x).view(B, N, num_heads, -1).split([key_dim, key_dim, val_dim])`` (conv: the same on
# channels), per head q k v; ``AttentionDownsample``: ``kv`` per head k v, ``q`` a block. EfficientFormerV2
# ``Attention2d``: q, k, v separate, each ``reshape(B, num_heads, -1, N)``: blocks; ``Attention2dDownsample``'s q is
# a LocalGlobalQuery whose 1×1 ``proj`` makes it. Output: ``proj`` (a Sequential ending in that norm-wrapped
# projection), its input head-major. Both put an activation between the attention and ``proj``.
NORM_WRAPPED = {"timm.models.levit.Attention", "timm.models.levit.AttentionDownsample",
                "timm.models.efficientformer_v2.Attention2d", "timm.models.efficientformer_v2.Attention2dDownsample"}


def _inner(m: nn.Module | None, attr: str) -> tuple[nn.Module, str] | None:
    """(parent, attribute) of the projection ``m.attr`` stands for: itself, or the Linear / 1×1 conv inside a
    ConvNorm / LinearNorm (``linear``, ``conv``), a Sequential's last norm-wrapped layer (``ln``) or a query
    module's ``proj``."""
    child = getattr(m, attr, None)
    if child is None:
        return None
    if _proj(m, attr) is not None:
        return m, attr
    for name in ("linear", "conv"):
        if _proj(child, name) is not None and isinstance(getattr(child, "bn", None), nn.modules.batchnorm._BatchNorm):
            return child, name
    for name in ("ln", "proj"):
        if getattr(child, name, None) is not None:
            return _inner(child, name)
    return None


def _norm_wrapped_matches(m: nn.Module) -> bool:
    return (class_path(m) in NORM_WRAPPED and _num_heads(m) is not None and _inner(m, "proj") is not None
            and all(_inner(m, a) is not None for a in (("qkv",) if hasattr(m, "qkv") else ("q", "kv") if
                                                        hasattr(m, "kv") else ("q", "k", "v"))))


def _norm_wrapped_describe(m: nn.Module, parent: nn.Module, attr: str) -> tuple[nn.Module, AttentionSites]:
    heads = _num_heads(m)
    kd = int(m.key_dim)
    vd = int(getattr(m, "val_dim", 0) or m.d)

    def site(name: str, index: torch.Tensor, total: int) -> Site:
        p, a = _inner(m, name)
        if _rows(getattr(p, a)) != total:
            raise UnsupportedBackboneError(f"{type(m).__name__}.{name} has {_rows(getattr(p, a))} rows, not the "
                                           f"{total} its num_heads, key_dim and val_dim say: report the family")
        return Site(p, a, index)

    if hasattr(m, "qkv"):
        sites = {s: site("qkv", interleaved_index(heads, (kd, kd, vd), i), heads * (2 * kd + vd))
                 for i, s in enumerate(("q", "k", "v"))}
    elif hasattr(m, "kv"):
        sites = {s: site("kv", interleaved_index(heads, (kd, vd), i), heads * (kd + vd))
                 for i, s in enumerate(("k", "v"))}
        sites["q"] = site("q", block_index(0, heads, kd), heads * kd)
    else:
        sites = {s: site(s, block_index(0, heads, d), heads * d) for s, d in (("q", kd), ("k", kd), ("v", vd))}
    p, a = _inner(m, "proj")
    sites["o"] = Site(p, a, block_index(0, heads, _split(_cols(getattr(p, a)), 1, heads, f"{type(m).__name__}.proj")))
    return m, AttentionSites(heads, kd, sites)


register_layout(HeadLayout("norm_wrapped", "each projection a Linear / 1×1 conv inside a BatchNorm wrapper: LeViT "
                           "`qkv` per head q k v (`kv` per head k v, `q` a block), EfficientFormerV2 `q`, `k`, `v` "
                           "blocks", _norm_wrapped_matches, _norm_wrapped_describe))


# --- timm ByobNet self-attention on (B, C, H, W) maps, 1×1 convolutions and no output projection of their own ------
# BottleneckAttn: ``qkv`` split into q | k | v blocks (q, k of dim_head_qk, v of dim_head_v per head), each
# ``reshape(B * num_heads, dim_head, -1)``. HaloAttn: ``q`` a block; ``kv`` unfolded as
# ``reshape(B * num_heads, dim_head_qk + dim_head_v, …)`` then split: per head k v. Both add a relative-position
# term computed from q. The block's next convolution follows them, so there is no o here.
BYOB = {"timm.layers.bottleneck_attn.BottleneckAttn", "timm.layers.halo_attn.HaloAttn"}


def _byob_matches(m: nn.Module) -> bool:
    return class_path(m) in BYOB and (_proj(m, "qkv") is not None or _proj(m, "kv") is not None)


def _byob_describe(m: nn.Module, parent: nn.Module, attr: str) -> tuple[nn.Module, AttentionSites]:
    heads, dq, dv = int(m.num_heads), int(m.dim_head_qk), int(m.dim_head_v)
    missing = {"o": "no output projection: the block's next convolution follows the attention"}
    if _proj(m, "qkv") is not None:
        sites = {s: Site(m, "qkv", block_index(off, heads, d))
                 for s, off, d in (("q", 0, dq), ("k", heads * dq, dq), ("v", 2 * heads * dq, dv))}
        total = _rows(m.qkv)
    else:
        sites = {s: Site(m, "kv", interleaved_index(heads, (dq, dv), i)) for i, s in enumerate(("k", "v"))}
        total = _rows(m.kv) + heads * dq
        if _proj(m, "q") is not None:
            sites["q"] = Site(m, "q", block_index(0, heads, dq))
        else:
            missing["q"] = "q is a strided convolution here (it subsamples the queries)"
    if total != heads * (2 * dq + dv):
        raise UnsupportedBackboneError(f"{type(m).__name__} has {total} q/k/v rows, not {heads} heads × "
                                       f"{2 * dq + dv}: report the family")
    return m, AttentionSites(heads, dq, sites, missing)


register_layout(HeadLayout("byob_conv", "1×1 convolutions: BottleneckAttn `qkv` rows q | k | v, HaloAttn `q` a block "
                           "and `kv` per head k v; no output projection (timm BoTNet, HaloNet)", _byob_matches,
                           _byob_describe))


# --- q and k|v (or q|k and v) in two Linears ------------------------------------------------------------------
# Attention pooling, cross-attention to a sub-sampled sequence, class attention and ConViT's GPSA. Each reshapes
# the fused Linear as (2, num_heads, head_dim): blocks.
Q_KV = {"timm.models.twins.GlobalSubSampleAttn", "timm.models.pvt_v2.Attention", "timm.models.volo.ClassAttention",
        "timm.layers.attention_pool.AttentionPoolLatent"}
QK_V = {"timm.models.convit.GPSA", "timm.models.tnt.Attention"}


def _pair_matches(m: nn.Module) -> bool:
    path = class_path(m)
    if path in Q_KV:
        return _linear(m, "kv") is not None and _num_heads(m) is not None
    return path in QK_V and _linear(m, "qk") is not None and _linear(m, "v") is not None and _num_heads(m) is not None


def _pair_describe(m: nn.Module, parent: nn.Module, attr: str) -> tuple[nn.Module, AttentionSites]:
    heads = _num_heads(m)
    fused, single = ("kv", "q") if class_path(m) in Q_KV else ("qk", "v")
    slots = ("k", "v") if fused == "kv" else ("q", "k")
    lin = getattr(m, fused)
    d = _split(lin.out_features, 2, heads, f"{type(m).__name__}.{fused}")
    sites = {s: Site(m, fused, block_index(i * heads * d, heads, d)) for i, s in enumerate(slots)}
    missing = {}
    one = _linear(m, single)
    if one is not None:
        sites[single] = Site(m, single, block_index(0, heads, _split(one.out_features, 1, heads, single)))
    else:
        missing[single] = f"{single} is not a Linear here (a learned latent query used as it is)"
    sites.update(_o_site(m, ("proj",), heads))
    if "o" not in sites:
        missing["o"] = "no output projection"
    return m, AttentionSites(heads, d, sites, missing)


register_layout(HeadLayout("q_kv_pair", "two Linears: `q` and `kv` (rows k | v), or `qk` (rows q | k) and `v`; "
                           "heads contiguous in each", _pair_matches, _pair_describe))


# --- timm ViT ParallelScalingBlock (ViT-22B style): one ``in_proj`` Linear makes the MLP's hidden features and q, k,
#     v, ``torch.split(y, [mlp_hidden, dim, dim, dim])``, each ``view(B, N, num_heads, head_dim)``: blocks after the
#     MLP's rows. The heads' output goes to ``attn_out_proj``, or to the first ``dim`` columns of a fused ``out_proj``
#     (``cat((x_attn, x_mlp))``).
PARALLEL = {"timm.models.vision_transformer.ParallelScalingBlock"}


def _parallel_matches(m: nn.Module) -> bool:
    return (class_path(m) in PARALLEL and _linear(m, "in_proj") is not None and _num_heads(m) is not None
            and (_linear(m, "attn_out_proj") is not None or _linear(m, "out_proj") is not None))


def _parallel_describe(m: nn.Module, parent: nn.Module, attr: str) -> tuple[nn.Module, AttentionSites]:
    heads, d = int(m.num_heads), int(m.head_dim)
    mlp, dim = int(m.in_split[0]), heads * d
    if list(m.in_split) != [mlp, dim, dim, dim] or m.in_proj.out_features != mlp + 3 * dim:
        raise UnsupportedBackboneError(f"{type(m).__name__}.in_proj splits as {list(m.in_split)}, not the MLP's rows "
                                       f"then q, k, v of {dim}: report the family")
    sites = {s: Site(m, "in_proj", block_index(mlp + i * dim, heads, d)) for i, s in enumerate(("q", "k", "v"))}
    o = "attn_out_proj" if _linear(m, "attn_out_proj") is not None else "out_proj"
    sites["o"] = Site(m, o, block_index(0, heads, d))
    return m, AttentionSites(heads, d, sites)


register_layout(HeadLayout("parallel_block", "one Linear `in_proj`: rows MLP hidden | q | k | v, heads contiguous; "
                           "o = `attn_out_proj` or the first columns of `out_proj` (timm ViT ParallelScalingBlock)",
                           _parallel_matches, _parallel_describe))


# --- separate q/k/v Linears: Hugging Face 5.x (ViT, DeiT, DINOv2, Swin, BEiT), CLIP, SigLIP, Aimv2; timm EVA with
#     q_proj; CaiT class attention (q, k, v); CrossViT cross-attention (wq, wk, wv) --------------------------------
SEPARATE_NAMES = (("q_proj", "k_proj", "v_proj"), ("q", "k", "v"), ("wq", "wk", "wv"), ("query", "key", "value"))
O_NAMES = ("o_proj", "out_proj", "proj")


def _separate_names(m: nn.Module) -> tuple[str, str, str] | None:
    return next((names for names in SEPARATE_NAMES if all(_linear(m, n) is not None for n in names)), None)


def _separate_matches(m: nn.Module) -> bool:
    return _separate_names(m) is not None and any(_linear(m, n) for n in O_NAMES) and _num_heads(m) is not None


def _kv_heads(m: nn.Module) -> int | None:
    """The k/v head count a grouped-query attention states (timm ``num_kv_heads``, Hugging Face
    ``num_key_value_heads`` on the module or its config), or None."""
    for owner in (m, getattr(m, "config", None)):
        for attr in ("num_kv_heads", "num_key_value_heads"):
            n = getattr(owner, attr, None)
            if isinstance(n, int) and not isinstance(n, bool) and n > 0:
                return n
    return None


def _grouped_kv(m: nn.Module, heads: int, rows: dict[str, int]) -> str | None:
    """Why k and v cannot be split by the query heads (grouped-query attention: fewer k/v heads, each shared by a
    group of query heads), or None when they can. Wider v heads than q's (more v rows: an attention ratio, as in
    LeViT-style designs) split by the same heads, each its own share of v's rows."""
    kv = _kv_heads(m)
    if kv is not None and kv != heads:
        return (f"grouped-query attention: {kv} k/v heads shared by the {heads} query heads, so k and v cannot be "
                "split by head")
    if rows["k"] != rows["q"] or rows["v"] < rows["q"]:
        return (f"grouped-query attention (k and v have {rows['k']} and {rows['v']} rows, q {rows['q']}): k/v heads "
                "shared by several query heads cannot be split by head")
    return None


def _separate_describe(m: nn.Module, parent: nn.Module, attr: str) -> tuple[nn.Module, AttentionSites]:
    heads = _num_heads(m)
    names = dict(zip(("q", "k", "v"), _separate_names(m)))
    grouped = _grouped_kv(m, heads, {t: getattr(m, n).out_features for t, n in names.items()})
    targets = ("q",) if grouped else ("q", "k", "v")
    sites = {}
    for t in targets:
        rows = getattr(m, names[t]).out_features
        sites[t] = Site(m, names[t], block_index(0, heads, _split(rows, 1, heads, names[t])))
    sites.update(_o_site(m, O_NAMES, heads))
    missing = {"k": grouped, "v": grouped} if grouped else {}
    return m, AttentionSites(heads, sites["q"].index.shape[1], sites, missing)


register_layout(HeadLayout("separate_qkvo", "one Linear per projection (q_proj / q / wq, …; o_proj / out_proj / "
                           "proj), heads contiguous", _separate_matches, _separate_describe))


# --- BERT-style: attention.{self|attention}.{query,key,value} and attention.output.dense (transformers 4.x ViT,
#     DeiT, DINOv2, Swin; BERT; Swinv2 and Data2VecVision in 5.x) ---------------------------------------------------

def _bert_inner(m: nn.Module) -> nn.Module | None:
    for name in ("self", "attention"):
        s = getattr(m, name, None)
        if isinstance(s, nn.Module) and all(_linear(s, n) is not None for n in ("query", "key", "value")):
            return s
    return None


def _bert_matches(m: nn.Module) -> bool:
    s = _bert_inner(m)
    return s is not None and _linear(getattr(m, "output", None), "dense") is not None and _num_heads(s) is not None


def _bert_describe(m: nn.Module, parent: nn.Module, attr: str) -> tuple[nn.Module, AttentionSites]:
    s = _bert_inner(m)
    heads = _num_heads(s)
    sites = {t: Site(s, n, block_index(0, heads, _split(getattr(s, n).out_features, 1, heads, n)))
             for t, n in zip(("q", "k", "v"), ("query", "key", "value"))}
    sites.update(_o_site(m, ("dense",), heads, parent=m.output))
    return m, AttentionSites(heads, sites["q"].index.shape[1], sites)


register_layout(HeadLayout("bert_style", "`query`, `key`, `value` Linears and `output.dense`, heads contiguous",
                           _bert_matches, _bert_describe))


# --- torch.nn.MultiheadAttention (torchvision ViT, OpenCLIP, HF SigLIP's pooling head) -----------------------------

class LinearInProjMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` with its in-projection held by a Linear, so adapters can wrap it. Same call
    signature and results; the Parameters are the original ones (moved, not copied)."""

    # nn.TransformerEncoderLayer / nn.TransformerEncoder read these before their fused inference path; False keeps
    # them off it (the fused kernel takes in_proj_weight itself, bypassing the adapters)
    _qkv_same_embed_dim = False

    @property
    def in_proj_weight(self) -> torch.Tensor:
        return self.in_proj.weight

    @property
    def in_proj_bias(self) -> torch.Tensor | None:
        return self.in_proj.bias

    def __init__(self, mha: nn.MultiheadAttention) -> None:
        super().__init__()
        if not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn:
            raise UnsupportedBackboneError(
                "nn.MultiheadAttention with separate k/v dims, bias_k/bias_v or add_zero_attn is not supported: "
                "build it with kdim = vdim = embed_dim"
            )
        e = mha.embed_dim
        self.embed_dim, self.num_heads, self.batch_first, self.dropout = e, mha.num_heads, mha.batch_first, mha.dropout
        self.in_proj = nn.Linear(e, 3 * e, bias=mha.in_proj_bias is not None,
                                 device=mha.in_proj_weight.device, dtype=mha.in_proj_weight.dtype)
        self.in_proj.weight = mha.in_proj_weight
        if mha.in_proj_bias is not None:
            self.in_proj.bias = mha.in_proj_bias
        self.out_proj = mha.out_proj

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        batched = query.dim() == 3
        if not batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        if not self.batch_first or not batched:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        e = self.embed_dim
        if query is key and key is value:
            q, k, v = self.in_proj(query).split(e, dim=-1)
        else:  # cross-attention: each input through its own rows (the adapters of those rows included)
            q, k, v = self.in_proj(query)[..., :e], self.in_proj(key)[..., e:2 * e], self.in_proj(value)[..., 2 * e:]
        b, n, _ = q.shape
        h, d = self.num_heads, e // self.num_heads
        q, k, v = (t.reshape(b, -1, h, d).transpose(1, 2) for t in (q, k, v))
        mask = _merge_masks(attn_mask, key_padding_mask, b, h, n, k.shape[2], q.dtype, q.device, is_causal)
        p = self.dropout if self.training else 0.0
        if need_weights:
            logits = q @ k.transpose(-2, -1) / d**0.5
            if mask is not None:
                logits = logits + mask
            weights = logits.softmax(-1)
            out = F.dropout(weights, p) @ v
        else:
            weights = None
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        out = self.out_proj(out.transpose(1, 2).reshape(b, n, e))
        if not self.batch_first or not batched:
            out = out.transpose(0, 1)
        if not batched:
            out = out.squeeze(1)
            weights = None if weights is None else weights.squeeze(0)
        if weights is not None and average_attn_weights:
            weights = weights.mean(dim=-3)
        return out, weights


def _merge_masks(attn_mask: torch.Tensor | None, key_padding_mask: torch.Tensor | None, b: int, h: int, n: int,
                 s: int, dtype: torch.dtype, device: torch.device, is_causal: bool) -> torch.Tensor | None:
    """One additive float mask of shape broadcastable to (b, h, n, s), from torch's boolean or float masks."""

    def additive(m: torch.Tensor) -> torch.Tensor:
        if m.dtype == torch.bool:
            return torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(m, float("-inf"))
        return m.to(dtype)

    mask = None
    if attn_mask is None and is_causal:
        attn_mask = torch.ones(n, s, dtype=torch.bool, device=device).triu(1)
    if attn_mask is not None:
        mask = additive(attn_mask)
        mask = mask.view(b, h, n, s) if mask.dim() == 3 else mask.view(1, 1, n, s)
    if key_padding_mask is not None:
        kpm = additive(key_padding_mask).view(b, 1, 1, s)
        mask = kpm if mask is None else mask + kpm
    return mask


def _mha_describe(m: nn.Module, parent: nn.Module, attr: str) -> tuple[nn.Module, AttentionSites]:
    new = LinearInProjMultiheadAttention(m)
    new.train(m.training)
    setattr(parent, attr, new)
    e, h = new.embed_dim, new.num_heads
    d = e // h
    sites = {s: Site(new, "in_proj", block_index(i * e, h, d)) for i, s in enumerate(("q", "k", "v"))}
    sites["o"] = Site(new, "out_proj", block_index(0, h, d))
    return new, AttentionSites(h, d, sites)


register_layout(HeadLayout("torch_mha", "`in_proj_weight` rows q | k | v, heads contiguous (moved into a Linear)",
                           lambda m: isinstance(m, nn.MultiheadAttention), _mha_describe))


# --- discovery -------------------------------------------------------------------------------------------------

# Modules that are attention by name but have no q, k, v to adapt, with the reason a user is told.
NOT_QKV = {
    "OutlookAttention": "outlook attention computes its weights from one Linear, with no q and k",
    "ChannelAttn": "channel gating, no heads", "SpatialAttn": "spatial gating, no heads",
    "LightChannelAttn": "channel gating, no heads", "LightSpatialAttn": "spatial gating, no heads",
    "CoordAttn": "coordinate gating, no heads", "SimpleCoordAttn": "coordinate gating, no heads",
    "SelectiveKernelAttn": "kernel selection, no heads", "SplitAttn": "split attention over channels, no heads",
    "EfficientAdditiveAttention": "additive attention with no per-head q/k/v",
    "LinearSelfAttention": "separable linear attention with no heads",
    "CascadedGroupAttention": "each head has its own q/k/v convolution, fed the previous head's output (cascaded "
                              "heads), not one projection split by head",
    "ConvAttention": "multi-head convolutional attention: a grouped 3×3 convolution, with no q and k",
    "SHSA": "single-head attention on part of the channels: no heads to tell apart",
    "LiteMLA": "multi-scale ReLU linear attention: its q, k, v pass through grouped aggregation convolutions",
    "LambdaLayer": "lambda layer: k and v are shared by every head (multi-query), so they cannot be split by head",
    "MultiQueryAttention2d": "multi-query attention: one k and one v shared by every head, so they cannot be split "
                             "by head",
}
_ATTENTION_WORDS = ("attention", "attn", "mhsa")


@dataclass
class Unadapted:
    """An attention module attach left alone, and why."""

    name: str
    cls: str
    reason: str


def _looks_like_attention(m: nn.Module) -> bool:
    if isinstance(m, nn.MultiheadAttention):
        return True
    cls = type(m).__name__
    named = cls in NOT_QKV or any(w in cls.lower() for w in _ATTENTION_WORDS)  # NOT_QKV: SHSA, LiteMLA, …
    return named and any(True for _ in m.parameters())


def _reason(m: nn.Module) -> str:
    cls = type(m).__name__
    if cls in NOT_QKV:
        return NOT_QKV[cls]
    convs = [n for n in ("qkv", "q", "k", "v", "kv", "qk") if isinstance(getattr(m, n, None), nn.Conv2d)]
    if convs and not any(is_pointwise_conv(getattr(m, n)) for n in convs):
        return "q, k, v come from a k×k, strided or grouped convolution, not an nn.Linear or 1×1 convolution"
    fused = [n for n in ("qkv", "kv", "qk") if _proj(m, n) is not None]
    if fused:
        return (f"the row order of its fused `{fused[0]}` projection is unknown: add {class_path(m)} to the right "
                "table in heartlora/method/layouts.py once its source is read")
    for n in ("qkv", "q", "kv"):
        child = getattr(m, n, None)
        if child is not None and not isinstance(child, nn.Linear):
            return f"`{n}` is a {type(child).__name__}, not an nn.Linear"
    return "no q/k/v Linears heartlora recognises"


def scan_attention(model: nn.Module) -> tuple[list[tuple[str, HeadLayout, nn.Module, nn.Module, str]],
                                               list[Unadapted]]:
    """(name, layout, module, parent, attribute) for every attention module a layout matches, outermost first, in
    module order; and the attention-like modules left alone (innermost, outside the matched ones), with reasons."""
    found: list[tuple[str, HeadLayout, nn.Module, nn.Module, str]] = []
    left: list[tuple[str, nn.Module]] = []

    def walk(parent: nn.Module, prefix: str) -> bool:
        """True when something below ``parent`` was matched or listed (so ``parent`` itself is not listed)."""
        below = False
        for attr, child in parent.named_children():
            name = f"{prefix}.{attr}" if prefix else attr
            layout = next((lay for lay in LAYOUTS if lay.matches(child)), None)
            if layout is not None:
                found.append((name, layout, child, parent, attr))
                below = True
                continue
            inner = walk(child, name)
            if not inner and _looks_like_attention(child):
                left.append((name, child))
                inner = True
            below = below or inner
        return below

    walk(model, "")
    return found, [Unadapted(n, type(m).__name__, _reason(m)) for n, m in left]


def find_attention(model: nn.Module) -> list[tuple[str, HeadLayout, nn.Module, nn.Module, str]]:
    """The matched attention modules of :func:`scan_attention`; UnsupportedBackboneError when there is none."""
    found, left = scan_attention(model)
    if not found:
        works = "timm ViT/DeiT/EVA/BEiT/Swin/…, Hugging Face ViT/DeiT/DINOv2/Swin/CLIP/SigLIP, torchvision ViT"
        if left:
            seen = "; ".join(sorted({f"{u.cls} ({u.reason})" for u in left}))
            raise UnsupportedBackboneError(f"{type(model).__name__} has no attention heartlora can adapt: {seen}. "
                                           f"Families that work: {works} (docs/BACKBONES.md)")
        raise UnsupportedBackboneError(f"no attention layer found in {type(model).__name__}: heartlora adapts "
                                       f"transformer attention, e.g. {works} (docs/BACKBONES.md)")
    return found
