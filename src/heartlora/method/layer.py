"""The adapter modules: a Linear wrapper that adds per-head LoRA deltas for the projections it computes.

One projection (q, k, v or o of one attention layer) holds two Parameters, as PEFT's LoRA does: ``lora_A`` and
``lora_B``. The per-head factor (B for q, k, v; A for o) holds the rows (columns) of the *active* heads only, so an
adapted projection runs as two matrix products and one add, whatever the number of heads; switching heads off
rebuilds that factor without their rows (:meth:`HeadLoRAProjection.remove_heads` returns what an optimizer needs to
carry its state over), so an off head has no parameter, gradient, optimizer state, stored byte or compute.

Where each head's rows are in the wrapped Linear is an index (``index[h]``, from the layout), so any row order works:
q|k|v blocks, heads interleaved, or a Linear that holds only some of q, k, v.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from heartlora.errors import ConfigError
from heartlora.method import quant
from heartlora.method.config import FLOAT_BITS

OUT_SIDE = ("q", "k", "v")  # head h owns the rows index[h] of the Linear's output: its rows of B
IN_SIDE = ("o",)  # head h owns the columns index[h] of the Linear's input: its columns of A
MODES = ("forward", "weight")


@dataclass
class FactorChange:
    """How one Parameter changed when heads switched off: ``new`` (None when the factor was dropped) keeps the
    slices ``keep`` of ``old`` along ``dim``. :func:`heartlora.method.deactivate.replace_in_optimizer` uses it to
    carry the optimizer state of the heads that stay."""

    old: nn.Parameter
    new: nn.Parameter | None
    dim: int
    keep: torch.Tensor | None


class HeadLoRAProjection(nn.Module):
    """LoRA on one projection of one attention layer, organised by head.

    In the maths ``lora_A`` is (r × in) and ``lora_B`` is (out × r). For q, k, v only the active heads' rows of B
    exist: ``lora_B`` is (n_active·d × r), head by head in ascending order, and ``index[h]`` says which output rows
    of the wrapped Linear head h's d rows are. For o only the active heads' columns of A exist: ``lora_A`` is
    (r × n_active·d) and ``index[h]`` names the Linear's input columns that carry head h's output.
    """

    def __init__(self, target: str, layer_name: str, index: torch.Tensor, in_features: int, out_features: int,
                 rank: int, scale: float, bits: int, init_b_std: float | None) -> None:
        super().__init__()
        index = torch.as_tensor(index, dtype=torch.long)
        if index.dim() != 2:
            raise ValueError(f"index must be (num_heads, head_dim), got shape {tuple(index.shape)}")
        num_heads, head_dim = index.shape
        self.target, self.layer_name = target, layer_name
        self.num_heads, self.head_dim, self.rank, self.scale, self.bits = num_heads, head_dim, rank, scale, bits
        self.in_features, self.out_features = in_features, out_features
        self.per_head_is_B = target in OUT_SIDE
        limit = out_features if self.per_head_is_B else in_features
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= limit
                              or index.unique().numel() != index.numel()):
            raise ValueError(f"index for {layer_name}.{target} must name distinct positions below {limit}")
        # A loaded k-bit adapter holds decoded values: they are used exactly as stored until the weights change
        # (further training), and from then on quantized again like any k-bit adapter (see mark_decoded).
        self._decoded_versions: tuple[int, int] | None = None
        self._decoded_values: tuple[torch.Tensor, torch.Tensor] | None = None
        self._decoded_stats: dict[str, torch.Tensor] | None = None  # (mean, std) per factor, as the file had them
        self.register_buffer("index", index.clone(), persistent=False)
        # Follows .to(dtype) even when every head is off and no Parameter is left to ask.
        self.register_buffer("_anchor", torch.empty(0), persistent=False)
        # A as in nn.Linear / LoRA (Kaiming-uniform over the full matrix); B zero, or a small truncated normal for
        # quantized adapters, whose standardisation is undefined on an all-zero matrix (docs/METHOD.md).
        a = torch.empty(rank, in_features if self.per_head_is_B else num_heads * head_dim)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        b = torch.zeros(num_heads * head_dim if self.per_head_is_B else out_features, rank)
        if init_b_std is None and bits != FLOAT_BITS:
            init_b_std = 0.001
        if init_b_std:
            nn.init.trunc_normal_(b, std=init_b_std, a=-2 * init_b_std, b=2 * init_b_std)
        self.lora_A = nn.Parameter(a)
        self.lora_B = nn.Parameter(b)
        self._set_active(list(range(num_heads)))

    # --- heads -------------------------------------------------------------------------------------------------
    @property
    def per_head(self) -> nn.Parameter | None:
        """The factor split by head (B for q, k, v; A for o), active heads only; None once every head is off."""
        return self.lora_B if self.per_head_is_B else self.lora_A

    @property
    def shared(self) -> nn.Parameter | None:
        """The factor all heads share (A for q, k, v; B for o); None once every head is off."""
        return self.lora_A if self.per_head_is_B else self.lora_B

    def active_heads(self) -> list[int]:
        return list(self._active)

    def head_mask(self) -> list[bool]:
        act = set(self._active)
        return [h in act for h in range(self.num_heads)]

    def head_weights(self, h: int) -> torch.Tensor:
        """A view of active head ``h``'s share of the per-head factor: its (d × r) rows of B for q, k, v, its
        (r × d) columns of A for o."""
        if h not in self._active:
            raise KeyError(f"head {h} of {self.layer_name}.{self.target} is off")
        i = self._active.index(h) * self.head_dim
        p = self.per_head
        return p[i:i + self.head_dim] if self.per_head_is_B else p[:, i:i + self.head_dim]

    def _set_active(self, heads: list[int]) -> None:
        self._active = sorted(heads)
        device = self.index.device
        self.register_buffer("_active_heads", torch.tensor(self._active, dtype=torch.long, device=device),
                             persistent=False)
        flat = self.index[self._active].reshape(-1) if self._active else self.index.new_zeros(0)
        self.register_buffer("_rows", flat, persistent=False)
        # Every position of the Linear's output (q, k, v) or input (o), in order: no index operation is needed.
        self._covers_all = bool(flat.numel() == (self.out_features if self.per_head_is_B else self.in_features)
                                and torch.equal(flat, torch.arange(flat.numel(), device=device)))

    def remove_heads(self, heads: list[int]) -> list[FactorChange]:
        """Switch heads off. The per-head factor is rebuilt without their rows (columns); when no head is left both
        factors go. Returns the changes, so an optimizer's state can follow (see ``replace_in_optimizer``)."""
        gone = {h for h in heads if h in self._active}
        if not gone:
            return []
        still_decoded = self._decoded_versions is not None and not self._quantizes()
        stay = [h for h in self._active if h not in gone]
        changes: list[FactorChange] = []
        if not stay:
            changes = [FactorChange(p, None, 0, None) for p in (self.lora_A, self.lora_B)]
            self.lora_A = None
            self.lora_B = None
        else:
            pos = torch.tensor([i for i, h in enumerate(self._active) if h not in gone], dtype=torch.long)
            keep = (pos[:, None] * self.head_dim + torch.arange(self.head_dim)).reshape(-1).to(self.index.device)
            dim = 0 if self.per_head_is_B else 1
            old = self.per_head
            new = nn.Parameter(old.detach().index_select(dim, keep).clone(), requires_grad=old.requires_grad)
            if self.per_head_is_B:
                self.lora_B = new
            else:
                self.lora_A = new
            changes.append(FactorChange(old, new, dim, keep))
        if still_decoded:
            self.mark_decoded()  # still the decoded values, less the rows of the heads that left
        self._set_active(stay)
        return changes

    # --- weights -----------------------------------------------------------------------------------------------
    def mark_decoded(self, stats: dict[str, torch.Tensor] | None = None) -> None:
        """The factors now hold decoded k-bit values (a loaded adapter): use them as they are while they keep those
        values. Once they change (an optimizer step), they are latent weights again and the forward quantizes them
        (straight-through), so a loaded k-bit adapter keeps training as a k-bit adapter. A write that leaves the
        values as they were (DDP's broadcast, loading the same state, a deep copy) keeps them decoded. ``stats``:
        each factor's (mean, std) the values were decoded with (kept from before when not given), so that saving
        them again stores the same codes and statistics (``decoded_stats``)."""
        if self.lora_A is None or self.bits == FLOAT_BITS:  # float factors are used as they are: nothing to keep
            self._decoded_versions, self._decoded_values, self._decoded_stats = None, None, None
            return
        if stats is not None:
            self._decoded_stats = {k: v.detach().float().cpu().clone() for k, v in stats.items()}
        self._decoded_versions = self._versions()
        self._decoded_values = (self.lora_A.detach().clone(), self.lora_B.detach().clone())

    def decoded_stats(self) -> dict[str, torch.Tensor] | None:
        """Each factor's (mean, std) its loaded k-bit values were decoded with, while the factors still hold those
        values (None once trained further, or for an adapter not loaded from a file)."""
        if self._decoded_stats is None or self._quantizes():
            return None
        return self._decoded_stats

    def _versions(self) -> tuple[int, int] | None:
        if self.lora_A is None:
            return None
        return (self.lora_A._version, self.lora_B._version)

    def _quantizes(self) -> bool:
        if self.bits == FLOAT_BITS:
            return False
        if self._decoded_versions is None:
            return True
        if self._decoded_versions == self._versions():
            return False
        # written since: still the decoded values? (one comparison at the factors' device and dtype, so a .half()
        # model still compares equal; then the answer is kept)
        values = self._decoded_values
        same = (self.lora_A is not None and values is not None and values[0].shape == self.lora_A.shape
                and values[1].shape == self.lora_B.shape and torch.equal(values[0].to(self.lora_A), self.lora_A)
                and torch.equal(values[1].to(self.lora_B), self.lora_B))
        if same:
            self._decoded_versions = self._versions()
            return False
        self._decoded_versions, self._decoded_values, self._decoded_stats = None, None, None
        return True

    def effective_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) as the forward uses them (quantized with the straight-through estimator when bits < 32), over the
        active heads only."""
        a, b = self.lora_A, self.lora_B
        if self._quantizes():
            a, b = quant.quantize_ste(a, self.bits), quant.quantize_ste(b, self.bits)
        return a, b

    def per_head_matrix(self) -> torch.Tensor:
        """The active heads' factor: (n·d × r) for B, (r × n·d) for A."""
        return self.per_head

    def delta_weight(self, into: torch.Tensor | None = None) -> torch.Tensor:
        """``scale · B A`` added to ``into`` (a zero matrix of the wrapped Linear's shape by default) on the active
        heads' rows (columns); differentiable, out of place."""
        if into is None:
            into = torch.zeros(self.out_features, self.in_features, dtype=self._anchor.dtype, device=self.index.device)
        if not self._active:
            return into
        a, b = self.effective_weights()
        dw = ((b @ a) * self.scale).to(into.dtype)
        if self._covers_all:
            return into + dw
        return into.index_add(0 if self.per_head_is_B else 1, self._rows, dw)

    # --- forward -----------------------------------------------------------------------------------------------
    def add_delta(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``y + scale · x Aᵀ Bᵀ`` on the active heads' rows (q, k, v) or from their columns (o); ``y``, ``x`` 2-D.
        Two matrix products and one add (one indexed add, or one column gather, when the heads cover only part of
        the Linear)."""
        if not self._active:
            return y
        a, b = self.effective_weights()
        if a.dtype != y.dtype:  # half-precision base output without autocast: compute the delta in its dtype
            a, b, x = a.to(y.dtype), b.to(y.dtype), x.to(y.dtype)
        if self.per_head_is_B and not self._covers_all:
            d = x @ a.t() @ b.t()
            # under autocast the products come out in half precision whatever y is
            return y.index_add(1, self._rows, d if d.dtype == y.dtype else d.to(y.dtype), alpha=self.scale)
        xa = x if self.per_head_is_B or self._covers_all else x.index_select(1, self._rows)
        out = torch.addmm(y, xa @ a.t(), b.t(), alpha=self.scale)
        return out if out.dtype == y.dtype else out.to(y.dtype)

    # --- responsiveness ----------------------------------------------------------------------------------------
    def head_products(self, absolute: bool = False) -> torch.Tensor:
        """Per head, Σ θ·∂L/∂θ over the weights it owns (Σ |θ·∂L/∂θ| when ``absolute``, the ``sum_abs`` score);
        θ are the quantized values when bits < 32. Zero for heads that are off, or when the gradient is missing.
        Shape (num_heads,), float64; no host synchronisation."""
        out = torch.zeros(self.num_heads, dtype=torch.float64, device=self.index.device)
        p = self.per_head
        if p is None or p.grad is None:
            return out
        theta = p.detach()
        if self._quantizes():
            theta = quant.quantize(theta, self.bits)
        prod = theta * p.grad
        if absolute:
            prod = prod.abs()
        n = len(self._active)
        per = prod.view(n, self.head_dim, -1).sum((1, 2)) if self.per_head_is_B else \
            prod.view(prod.shape[0], n, self.head_dim).sum((0, 2))
        return out.index_copy(0, self._active_heads, per.double())

    def extra_repr(self) -> str:
        return (f"target={self.target}, heads={len(self._active)}/{self.num_heads}, head_dim={self.head_dim}, "
                f"rank={self.rank}, scale={self.scale}, bits={self.bits}")


class HeadLoRALinear(nn.Module):
    """Wraps a Linear (``base_layer``) and adds the deltas of the projections it computes: one for q or o, up to
    three for a fused qkv Linear.

    ``mode="forward"``: the attention calls this module, and the deltas are added to the base output.
    ``mode="weight"``: the attention reads ``.weight`` and calls ``F.linear`` itself (timm EVA, BEiT, SwinV2 build
    their qkv bias separately); ``.weight`` is then the base weight plus the deltas, so the adapters reach the
    output and get their gradient through it.

    Merging writes the deltas into the base weight and keeps a copy of the original weight for an exact unmerge
    (one more copy of each adapted Linear's weight while merged)."""

    def __init__(self, base_layer: nn.Linear, dropout: float = 0.0, mode: str = "forward") -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode {mode!r} is unknown: choose one of {', '.join(MODES)}")
        self.base_layer = base_layer
        self.mode = mode
        self.lora = nn.ModuleDict()
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.enabled = True
        self._original_weight: torch.Tensor | None = None
        self._register_load_state_dict_pre_hook(_load_plain_linear, with_module=True)
        # a merged layer's state dict holds the original weight beside the factors (base + delta and the factors
        # would add the delta twice when loaded), and a load into a merged layer lands on the unmerged weights
        (getattr(self, "register_state_dict_post_hook", None) or self._register_state_dict_hook)(_unmerged_state)
        self._register_load_state_dict_pre_hook(_unmerge_to_load, with_module=True)
        self.register_load_state_dict_post_hook(_merge_after_load)
        self._merge_after_load = False

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def _delta_active(self) -> bool:
        return not self.merged and self.enabled and any(p._active for p in self.lora.values())

    @property
    def weight(self) -> torch.Tensor:
        """The base weight; in ``weight`` mode, plus the adapters' deltas (the attention reads it directly)."""
        w = self.base_layer.weight
        if self.mode == "weight" and self._delta_active():
            for proj in self.lora.values():
                w = proj.delta_weight(w)
        return w

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged and self.training and torch.is_grad_enabled() \
                and any(p.requires_grad for p in self.lora.parameters()):
            raise ConfigError("the adapters are merged into the weights, so training would not reach them: call "
                              "heartlora.unmerge(model) before training, or model.eval() for inference")
        if self.mode == "weight":
            return F.linear(x, self.weight, self.bias)
        y = self.base_layer(x)
        if not self._delta_active():
            return y
        x2 = self.lora_dropout(x).reshape(-1, x.shape[-1])
        y2 = y.reshape(-1, y.shape[-1])
        return add_deltas(self, y2, x2, [p for p in self.lora.values() if p._active]).view(y.shape)

    def delta_weight(self) -> torch.Tensor:
        """The adapters' whole update of the base weight (heads switched off contribute nothing)."""
        delta = torch.zeros_like(self.base_layer.weight)
        for proj in self.lora.values():
            delta = proj.delta_weight(delta)
        return delta

    @torch.no_grad()
    def merge(self) -> None:
        """Add the update into the base weight (inference at the backbone's own cost); ``unmerge`` restores the
        exact original weight, kept aside."""
        if self.merged:
            return
        self._original_weight = self.base_layer.weight.detach().clone()
        self.base_layer.weight.add_(self.delta_weight())
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Put back the base weight ``merge`` kept (bit-exact)."""
        if not self.merged:
            return
        self.base_layer.weight.copy_(self._original_weight)
        self._original_weight = None
        self.merged = False



def _unmerged_state(module: HeadLoRALinear, state_dict: dict, prefix: str, local_metadata: object) -> None:
    if module.merged and prefix + "base_layer.weight" in state_dict:
        state_dict[prefix + "base_layer.weight"] = module._original_weight


def _unmerge_to_load(module: HeadLoRALinear, *args: object) -> None:
    module._merge_after_load = module.merged
    module.unmerge()


def _merge_after_load(module: HeadLoRALinear, incompatible_keys: object) -> None:
    if module._merge_after_load:
        module._merge_after_load = False
        module.merge()


def _load_plain_linear(module: HeadLoRALinear, state_dict: dict, prefix: str, *args: object) -> None:
    """A state dict of the model without heartlora (``….query.weight``, as a transformers Trainer checkpoint saved by
    HeartLoRACallback holds) loads into the adapted model: the Linear's entries go to ``base_layer``, and the
    adapter factors, which such a dict does not have, keep their values."""
    if prefix + "weight" not in state_dict or prefix + "base_layer.weight" in state_dict:
        return
    for name in ("weight", "bias"):
        if prefix + name in state_dict:
            state_dict[prefix + "base_layer." + name] = state_dict.pop(prefix + name)
    for name, value in module.lora.state_dict().items():
        state_dict.setdefault(f"{prefix}lora.{name}", value)


def add_deltas(owner: nn.Module, y: torch.Tensor, x: torch.Tensor, projs: list[HeadLoRAProjection]) -> torch.Tensor:
    """``y`` plus the deltas of the active projections ``projs`` of one Linear (``y``, ``x`` 2-D). Several
    output-side projections (q and v of a fused qkv) run as one product: their A stacked (Σr × in), their B
    block-diagonal (Σrows × Σr), so the input is read once and the output gets one indexed add (none when the rows
    cover the whole output in order). Each head keeps its own rows; an off head has none. ``owner`` keeps the joint
    row index between calls."""
    if len(projs) < 2 or not all(p.per_head_is_B and p.scale == projs[0].scale for p in projs):
        for proj in projs:
            y = proj.add_delta(y, x)
        return y
    # The joint row index, rebuilt whenever a projection's own index is a new tensor (heads switched off, the
    # module moved or copied); holding those tensors keeps the identity check sound.
    src = getattr(owner, "_shared_src", None)
    if src is None or len(src) != len(projs) or any(a is not p._rows for a, p in zip(src, projs)):
        rows = torch.cat([p._rows for p in projs])
        full = rows.numel() == y.shape[-1] and torch.equal(rows, torch.arange(rows.numel(), device=rows.device))
        owner._shared_src, owner._shared_rows, owner._shared_full = [p._rows for p in projs], rows, full
    weights = [p.effective_weights() for p in projs]
    a = torch.cat([w[0] for w in weights])
    b = torch.block_diag(*[w[1] for w in weights])
    if a.dtype != y.dtype:  # half-precision base output without autocast: compute the delta in its dtype
        a, b, x = a.to(y.dtype), b.to(y.dtype), x.to(y.dtype)
    scale = projs[0].scale
    if owner._shared_full:
        out = torch.addmm(y, x @ a.t(), b.t(), alpha=scale)
        return out if out.dtype == y.dtype else out.to(y.dtype)
    d = x @ a.t() @ b.t()
    return y.index_add(1, owner._shared_rows, d if d.dtype == y.dtype else d.to(y.dtype), alpha=scale)

class HeadLoRAConv1x1(HeadLoRALinear):
    """:class:`HeadLoRALinear` for a 1×1 convolution used as a projection on (B, C, H, W) maps (timm LeViT-conv,
    CoAtNet, Visformer, BoTNet, EfficientFormerV2): the same maths on the channel dimension. The forward moves
    channels last, adds the deltas as for a Linear and moves them back; merging treats the (out, in, 1, 1) weight as
    (out, in)."""

    def __init__(self, base_layer: nn.Conv2d, dropout: float = 0.0, mode: str = "forward") -> None:
        if not is_pointwise_conv(base_layer):
            raise ValueError("HeadLoRAConv1x1 wraps an ungrouped 1×1 nn.Conv2d with stride 1 and no padding")
        if mode != "forward":
            raise ValueError("a 1×1 convolution is adapted in forward mode only")
        super().__init__(base_layer, dropout, mode)

    @property
    def in_features(self) -> int:
        return self.base_layer.in_channels

    @property
    def out_features(self) -> int:
        return self.base_layer.out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if not self._delta_active():
            return y
        x2 = self.lora_dropout(x).movedim(1, -1).reshape(-1, x.shape[1])
        y_last = y.movedim(1, -1)
        y2 = add_deltas(self, y_last.reshape(-1, y.shape[1]), x2, [p for p in self.lora.values() if p._active])
        return y2.view(y_last.shape).movedim(-1, 1)

    def delta_weight(self) -> torch.Tensor:
        delta = self.base_layer.weight.new_zeros(self.out_features, self.in_features)
        for proj in self.lora.values():
            delta = proj.delta_weight(delta)
        return delta.view_as(self.base_layer.weight)


def is_pointwise_conv(m: nn.Module) -> bool:
    """An nn.Conv2d that is a Linear over channels: 1×1 kernel, stride 1, no padding, dilation 1, one group."""
    return (isinstance(m, nn.Conv2d) and tuple(m.kernel_size) == (1, 1) and tuple(m.stride) == (1, 1)
            and m.groups == 1 and (m.padding in ("valid", "same") or tuple(m.padding) == (0, 0))
            and m.padding_mode == "zeros")


def wrap_projection(base: nn.Module, dropout: float = 0.0, mode: str = "forward") -> HeadLoRALinear:
    """The wrapper for a projection: :class:`HeadLoRALinear` for an nn.Linear, :class:`HeadLoRAConv1x1` for a 1×1
    convolution."""
    if isinstance(base, nn.Conv2d):
        return HeadLoRAConv1x1(base, dropout, mode)
    return HeadLoRALinear(base, dropout, mode)
