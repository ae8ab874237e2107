"""Where the heads are: one registry entry per attention family.

An entry recognises an attention module and says, for each projection q, k, v, o, which ``nn.Linear`` computes it
and at which row offset (q, k and v may share one fused Linear). Adding a backbone family means adding one entry
here; the adapters, the scorer and the trainer only ever see :class:`AttentionSites`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from heartlora.errors import UnsupportedBackboneError


@dataclass
class Site:
    """Projection ``target`` lives in ``getattr(parent, attr)``, a Linear. ``index[h]`` are the output rows (q, k, v)
    or input columns (o) of that Linear that belong to head h. ``mode`` says how the attention uses the Linear:
    ``"forward"`` calls it, ``"weight"`` reads its weight and calls ``F.linear`` itself."""

    parent: nn.Module
    attr: str
    index: torch.Tensor
    mode: str = "forward"


def block_index(offset: int, num_heads: int, head_dim: int) -> torch.Tensor:
    """Heads one after another from ``offset``: head h owns [offset + h·d, offset + (h+1)·d)."""
    return offset + torch.arange(num_heads * head_dim).view(num_heads, head_dim)


@dataclass
class AttentionSites:
    num_heads: int
    head_dim: int
    sites: dict[str, Site]  # keys among q, k, v, o


@dataclass(frozen=True)
class HeadLayout:
    """An attention family. ``describe`` may replace the module in its parent first (``nn.MultiheadAttention``
    keeps q, k, v in a bare Parameter, so it is swapped for an equivalent module with a Linear in-projection)."""

    name: str
    matches: Callable[[nn.Module], bool]
    describe: Callable[[nn.Module, nn.Module, str], tuple[nn.Module, AttentionSites]]


LAYOUTS: list[HeadLayout] = []


def register_layout(layout: HeadLayout) -> HeadLayout:
    LAYOUTS.append(layout)
    return layout


def _is_linear(m: object) -> bool:
    return isinstance(m, nn.Linear)


# --- fused qkv Linear: timm Attention (ViT, DeiT), timm EVA, timm Swin WindowAttention -------------------------

def _fused_matches(m: nn.Module) -> bool:
    return _is_linear(getattr(m, "qkv", None)) and _is_linear(getattr(m, "proj", None)) and \
        isinstance(getattr(m, "num_heads", None), int)


def _fused_describe(m: nn.Module, parent: nn.Module, attr: str) -> tuple[nn.Module, AttentionSites]:
    heads = m.num_heads
    inner = m.qkv.out_features // 3
    d = inner // heads
    sites = {t: Site(m, "qkv", block_index(i * inner, heads, d)) for i, t in enumerate("qkv")}
    sites["o"] = Site(m, "proj", block_index(0, heads, d))
    return m, AttentionSites(heads, d, sites)


register_layout(HeadLayout("fused_qkv", _fused_matches, _fused_describe))


# --- separate q/k/v/o Linears: Hugging Face ViT and DINOv2 (transformers 5), timm EVA with q_proj -------------

def _separate_matches(m: nn.Module) -> bool:
    has_qkv = all(_is_linear(getattr(m, n, None)) for n in ("q_proj", "k_proj", "v_proj"))
    has_o = _is_linear(getattr(m, "o_proj", None)) or _is_linear(getattr(m, "proj", None))
    heads = getattr(m, "num_attention_heads", getattr(m, "num_heads", None))
    return has_qkv and has_o and isinstance(heads, int)


def _separate_describe(m: nn.Module, parent: nn.Module, attr: str) -> tuple[nn.Module, AttentionSites]:
    heads = getattr(m, "num_attention_heads", getattr(m, "num_heads", None))
    o_name = "o_proj" if _is_linear(getattr(m, "o_proj", None)) else "proj"
    d = m.q_proj.out_features // heads
    idx = block_index(0, heads, d)
    sites = {"q": Site(m, "q_proj", idx), "k": Site(m, "k_proj", idx), "v": Site(m, "v_proj", idx),
             "o": Site(m, o_name, idx)}
    return m, AttentionSites(heads, d, sites)


register_layout(HeadLayout("separate_qkvo", _separate_matches, _separate_describe))


# --- BERT-style: attention.self.{query,key,value} and attention.output.dense (BERT, older HF ViT) ---------------

def _bert_matches(m: nn.Module) -> bool:
    s, out = getattr(m, "self", None), getattr(m, "output", None)
    return s is not None and all(_is_linear(getattr(s, n, None)) for n in ("query", "key", "value")) and \
        _is_linear(getattr(out, "dense", None)) and isinstance(getattr(s, "num_attention_heads", None), int)


def _bert_describe(m: nn.Module, parent: nn.Module, attr: str) -> tuple[nn.Module, AttentionSites]:
    s = m.self
    heads = s.num_attention_heads
    d = s.query.out_features // heads
    idx = block_index(0, heads, d)
    sites = {"q": Site(s, "query", idx), "k": Site(s, "key", idx), "v": Site(s, "value", idx),
             "o": Site(m.output, "dense", idx)}
    return m, AttentionSites(heads, d, sites)


register_layout(HeadLayout("bert_style", _bert_matches, _bert_describe))


# --- torch.nn.MultiheadAttention (torchvision ViT, OpenCLIP) ---------------------------------------------------

class LinearInProjMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` with its in-projection held by a Linear, so adapters can wrap it. Same call
    signature and results; the Parameters are the original ones (moved, not copied)."""

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
    e, heads = new.embed_dim, new.num_heads
    d = e // heads
    sites = {t: Site(new, "in_proj", block_index(i * e, heads, d)) for i, t in enumerate("qkv")}
    sites["o"] = Site(new, "out_proj", block_index(0, heads, d))
    return new, AttentionSites(heads, d, sites)


register_layout(HeadLayout("torch_mha", lambda m: isinstance(m, nn.MultiheadAttention), _mha_describe))


# --- discovery -------------------------------------------------------------------------------------------------

def find_attention(model: nn.Module) -> list[tuple[str, HeadLayout, nn.Module, nn.Module, str]]:
    """(name, layout, module, parent, attribute) for every attention module, outermost match first, in module
    order. Raises UnsupportedBackboneError naming the classes seen when nothing matches."""
    found: list[tuple[str, HeadLayout, nn.Module, nn.Module, str]] = []
    claimed: list[str] = []

    def walk(parent: nn.Module, prefix: str) -> None:
        for attr, child in parent.named_children():
            name = f"{prefix}.{attr}" if prefix else attr
            layout = next((lay for lay in LAYOUTS if lay.matches(child)), None)
            if layout is not None:
                found.append((name, layout, child, parent, attr))
                claimed.append(name)
            else:
                walk(child, name)

    walk(model, "")
    if not found:
        classes = sorted({type(m).__name__ for m in model.modules() if "att" in type(m).__name__.lower()})
        seen = ", ".join(classes) if classes else "no module with 'Attention' in its class name"
        raise UnsupportedBackboneError(
            f"{type(model).__name__} has no attention module heartlora can adapt (saw: {seen}); supported layouts: "
            f"{', '.join(lay.name for lay in LAYOUTS)}; add an entry in heartlora/method/layouts.py for a new family"
        )
    return found
