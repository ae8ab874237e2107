"""The adapter modules: a Linear wrapper that adds per-head LoRA deltas for the projections it computes.

Each head's share of the adapter is a Parameter of its own (its rows of B for q, k, v; its columns of A for o), so a
head that is switched off is simply removed: it gets no gradient, holds no optimizer state, costs no compute and is
not stored. The factor the heads share (A for q, k, v; B for o) is one Parameter, dropped when no head is left.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from heartlora.method import quant
from heartlora.method.config import FLOAT_BITS

OUT_SIDE = ("q", "k", "v")  # head h owns rows [h·d, (h+1)·d) of B
IN_SIDE = ("o",)  # head h owns columns [h·d, (h+1)·d) of A


class HeadLoRAProjection(nn.Module):
    """LoRA on one projection (q, k, v or o) of one attention layer, split by head.

    ``lora_A`` is (r × in) and ``lora_B`` is (out × r) in the maths; for q, k, v the per-head factor is B and it is
    held as ``lora_B[str(h)]`` of shape (d × r); for o the per-head factor is A, held as ``lora_A[str(h)]`` (r × d).
    """

    def __init__(self, target: str, layer_name: str, offset: int, num_heads: int, head_dim: int,
                 in_features: int, out_features: int, rank: int, scale: float, bits: int,
                 init_b_std: float | None) -> None:
        super().__init__()
        self.target, self.layer_name, self.offset = target, layer_name, offset
        self.num_heads, self.head_dim, self.rank, self.scale, self.bits = num_heads, head_dim, rank, scale, bits
        self.per_head_is_B = target in OUT_SIDE
        # False once the weights hold decoded codes (a loaded k-bit adapter): re-standardising already quantized
        # values would move them, so they are used as they are.
        self.requantize = True
        # Follows .to(device/dtype) even when every head is off and no Parameter is left to ask.
        self.register_buffer("_anchor", torch.empty(0), persistent=False)
        # A as in nn.Linear / LoRA (Kaiming-uniform over the full matrix); B zero, or a small truncated normal for
        # quantized adapters, whose standardisation is undefined on an all-zero matrix (SPEC §4).
        a = torch.empty(rank, head_dim * num_heads if not self.per_head_is_B else in_features)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        b = torch.zeros(head_dim * num_heads if self.per_head_is_B else out_features, rank)
        if init_b_std is None and bits != FLOAT_BITS:
            init_b_std = 0.001
        if init_b_std:
            nn.init.trunc_normal_(b, std=init_b_std, a=-2 * init_b_std, b=2 * init_b_std)
        if self.per_head_is_B:
            self.lora_A = nn.Parameter(a)
            self.lora_B = nn.ParameterDict({str(h): nn.Parameter(blk.clone()) for h, blk in
                                            enumerate(b.split(head_dim, dim=0))})
        else:
            self.lora_A = nn.ParameterDict({str(h): nn.Parameter(blk.clone()) for h, blk in
                                            enumerate(a.split(head_dim, dim=1))})
            self.lora_B = nn.Parameter(b)
        self._refresh()

    # --- heads -------------------------------------------------------------------------------------------------
    @property
    def heads(self) -> nn.ParameterDict:
        """The per-head Parameters, keyed by head index."""
        return self.lora_B if self.per_head_is_B else self.lora_A

    @property
    def shared(self) -> nn.Parameter | None:
        """The factor all heads share (A for q, k, v; B for o); None once every head is off."""
        return self.lora_A if self.per_head_is_B else self.lora_B

    def active_heads(self) -> list[int]:
        return self._active

    def head_mask(self) -> list[bool]:
        act = set(self._active)
        return [h in act for h in range(self.num_heads)]

    def remove_heads(self, heads: list[int]) -> list[nn.Parameter]:
        """Switch heads off; returns the Parameters that left the module (to drop from an optimizer)."""
        removed = [self.heads.pop(str(h)) for h in heads if str(h) in self.heads]
        if not len(self.heads) and self.shared is not None:
            removed.append(self.shared)
            if self.per_head_is_B:
                self.lora_A = None
            else:
                self.lora_B = None
        self._refresh()
        return removed

    def _refresh(self) -> None:
        self._active = sorted(int(k) for k in self.heads.keys())
        # Contiguous runs of active heads, so the forward writes each run with one strided add.
        runs: list[tuple[int, int, int, int]] = []  # (first head, end head, row start, row end) in the concat
        row = 0
        for h in self._active:
            if runs and runs[-1][1] == h:
                first, _, r0, _ = runs[-1]
                runs[-1] = (first, h + 1, r0, row + self.head_dim)
            else:
                runs.append((h, h + 1, row, row + self.head_dim))
            row += self.head_dim
        self._runs = runs

    # --- weights -----------------------------------------------------------------------------------------------
    def _maybe_quantize(self, w: torch.Tensor) -> torch.Tensor:
        return w if self.bits == FLOAT_BITS or not self.requantize else quant.quantize_ste(w, self.bits)

    def per_head_matrix(self) -> torch.Tensor:
        """The active heads' factor, concatenated in head order: (n·d × r) for B, (r × n·d) for A."""
        parts = [self.heads[str(h)] for h in self._active]
        dim = 0 if self.per_head_is_B else 1
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)

    def effective_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) as used in the forward (quantized when bits < 32), over active heads only."""
        per_head = self._maybe_quantize(self.per_head_matrix())
        shared = self._maybe_quantize(self.shared)
        return (shared, per_head) if self.per_head_is_B else (per_head, shared)

    def delta_weight(self, out_features: int, in_features: int) -> torch.Tensor:
        """``scale · B A`` placed in a zero matrix of the wrapped Linear's shape."""
        delta = torch.zeros(out_features, in_features, dtype=self._dtype(), device=self._device())
        if not self._active:
            return delta
        a, b = self.effective_weights()
        if self.per_head_is_B:
            for h0, h1, r0, r1 in self._runs:
                rows = slice(self.offset + h0 * self.head_dim, self.offset + h1 * self.head_dim)
                delta[rows] += self.scale * (b[r0:r1] @ a)
        else:
            for h0, h1, r0, r1 in self._runs:
                cols = slice(self.offset + h0 * self.head_dim, self.offset + h1 * self.head_dim)
                delta[:, cols] += self.scale * (b @ a[:, r0:r1])
        return delta

    def _dtype(self) -> torch.dtype:
        return self._anchor.dtype

    def _device(self) -> torch.device:
        return self._anchor.device

    # --- forward -----------------------------------------------------------------------------------------------
    def add_delta(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``y + scale · x Aᵀ Bᵀ`` on the active heads' rows (q, k, v) or from their columns (o); y, x are 2-D.

        When the delta covers all of ``y`` it is one out-of-place addmm (cheaper under autograd than an in-place
        update); otherwise each run of active heads updates its slice of ``y`` in place."""
        if not self._active:
            return y
        a, b = self.effective_weights()
        if a.dtype != y.dtype:  # autocast: the base output is half precision, the adapter weights are not
            a, b, x = a.to(y.dtype), b.to(y.dtype), x.to(y.dtype)
        if not self.per_head_is_B:
            if len(self._runs) == 1 and self._runs[0][0] == 0 and self._runs[0][1] == self.num_heads:
                xa = x[:, self.offset:self.offset + self.num_heads * self.head_dim]
            else:
                xa = torch.cat([x[:, self.offset + h0 * self.head_dim:self.offset + h1 * self.head_dim]
                                for h0, h1, _, _ in self._runs], dim=1)
            return torch.addmm(y, xa @ a.t(), b.t(), alpha=self.scale)
        z = x @ a.t()
        if self.offset == 0 and b.shape[0] == y.shape[1]:  # every head on, and the Linear is this projection alone
            return torch.addmm(y, z, b.t(), alpha=self.scale)
        for h0, h1, r0, r1 in self._runs:
            o0, o1 = self.offset + h0 * self.head_dim, self.offset + h1 * self.head_dim
            y[:, o0:o1].addmm_(z, b[r0:r1].t(), alpha=self.scale)
        return y

    def head_products(self, absolute: bool = False) -> torch.Tensor:
        """Per head, Σ θ·∂L/∂θ over the weights it owns (Σ |θ·∂L/∂θ| when ``absolute``, the ``sum_abs`` score);
        θ are the quantized values when bits < 32. Zero for heads that are off, or when gradients are missing.
        Shape (num_heads,)."""
        out = torch.zeros(self.num_heads, dtype=torch.float64, device=self._device())
        if not self._active:
            return out
        params = [self.heads[str(h)] for h in self._active]
        if any(p.grad is None for p in params):
            return out
        theta = self.per_head_matrix().detach()
        if self.bits != FLOAT_BITS and self.requantize:
            theta = quant.quantize(theta, self.bits)
        grads = torch.cat([p.grad for p in params], dim=0 if self.per_head_is_B else 1)
        prod = theta * grads
        if absolute:
            prod = prod.abs()
        per = prod.view(len(params), self.head_dim, -1).sum((1, 2)) if self.per_head_is_B else \
            prod.view(prod.shape[0], len(params), self.head_dim).sum((0, 2))
        out[torch.tensor(self._active, device=out.device)] = per.double()
        return out

    def extra_repr(self) -> str:
        return (f"target={self.target}, heads={len(self._active)}/{self.num_heads}, head_dim={self.head_dim}, "
                f"rank={self.rank}, scale={self.scale}, bits={self.bits}")


class HeadLoRALinear(nn.Module):
    """Wraps a Linear (``base_layer``) and adds the deltas of the projections it computes: one for q or o, up to
    three for a fused qkv Linear. Merging writes the deltas into the base weight and keeps the original rows for an
    exact unmerge."""

    def __init__(self, base_layer: nn.Linear, dropout: float = 0.0) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.lora = nn.ModuleDict()
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.enabled = True
        self._original_weight: torch.Tensor | None = None

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def weight(self) -> torch.Tensor:  # some attention code reads proj.weight / proj.bias directly
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.merged or not self.enabled or not self.lora:
            return y
        x2 = self.lora_dropout(x).reshape(-1, x.shape[-1])
        y2 = y.reshape(-1, y.shape[-1])
        for proj in self.lora.values():
            y2 = proj.add_delta(y2, x2)
        return y2.view(y.shape)

    def delta_weight(self) -> torch.Tensor:
        w = self.base_layer.weight
        delta = torch.zeros_like(w)
        for proj in self.lora.values():
            delta += proj.delta_weight(w.shape[0], w.shape[1]).to(w.dtype)
        return delta

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        self._original_weight = self.base_layer.weight.detach().clone()
        self.base_layer.weight.add_(self.delta_weight())
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        self.base_layer.weight.copy_(self._original_weight)
        self._original_weight = None
        self.merged = False
