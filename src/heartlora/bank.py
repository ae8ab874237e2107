"""Many tasks on one backbone: :class:`AdapterBank` runs a batch whose rows belong to different adapters.

The frozen backbone is held once. Each adapted Linear is wrapped by a :class:`BankLinear` that computes the base
output for the whole batch and then adds each row's LoRA deltas (PEFT's mixed-adapter inference: the batch is sorted
by task so each group is a contiguous slice). Every task's factors on that Linear are stored once, exactly (active
heads only, k-bit ones decoded, the scale folded into B), as rows of a few shared tables. With few task groups in a
call, each group reads its factors as views and adds its deltas with two products per projection; with many, the
factors of every image's task are gathered into full-width ones (switched-off heads read a zero row) and one batched
product per factor serves the whole batch, so the number of operators does not grow with the number of tasks. Each
task keeps its own classifier (the file's ``modules_to_save``); a :class:`BankModule` in the classifier's place runs
each group through its task's copy and pads the outputs to the widest class count, and the bank cuts every row back
to its own classes.

Adapters are loaded with :func:`heartlora.load_adapter` itself (fingerprint, integrity and shape checks, k-bit
decoding, heads off), on the backbone restored to its plain state for the moment, and their projections are then
turned into the bank's tables: what the bank computes per row is what that task's own loaded model computes, up
to the order of floating-point operations (in float32, a few ulps; in half precision each delta is rounded once more
before it is added, so logits may differ by a few half-precision ulps).
"""

from __future__ import annotations

import copy
import json
import os
import re
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from heartlora.engine.inference import build_backbone, read_run_info, run_img_size
from heartlora.errors import AdapterFileError, ConfigError, UnsupportedBackboneError
from heartlora.method.layer import HeadLoRALinear, HeadLoRAProjection
from heartlora.method.model import backbone_fingerprint, find_classifier, is_adapted, remove_adapters
from heartlora.method.storage import RUN_KEY, AdapterContents, adapter_file, load_adapter, read_adapter


class _Route:
    """The current call's task groups, shared by every bank module: ``(task, start, end)`` over the sorted batch."""

    def __init__(self) -> None:
        self.batch = 0
        self.groups: list[tuple[str, int, int]] = []
        self.row_tasks = torch.zeros(0, dtype=torch.long)  # per row of the sorted batch: its task's place in the bank

    def slices(self, leading: int, where: str) -> Iterator[tuple[str, slice]]:
        """The groups as slices of a tensor whose first dimension is ``leading``: the batch, or a whole multiple of
        it laid out image by image (Swin's windows: each image's windows are consecutive)."""
        if self.batch == 0:
            raise RuntimeError(f"{where} runs outside an AdapterBank call: call the bank, not the model")
        if leading % self.batch:
            raise UnsupportedBackboneError(f"{where} sees a first dimension of {leading} for a batch of {self.batch}: "
                                           "this backbone mixes images inside a batch, so the bank cannot route rows")
        k = leading // self.batch
        for task, start, end in self.groups:
            yield task, slice(start * k, end * k)


class _Kind:
    """One adapted projection (q, k, v or o) of a shared Linear, as every task in the bank sees it: which output
    rows (q, k, v) or input columns (o) each head owns. Tasks made for one backbone share it; a task whose index
    differs gets its own kind."""

    def __init__(self, key: str, proj: HeadLoRAProjection) -> None:
        self.key, self.target, self.out_side = key, proj.target, proj.per_head_is_B
        self.index = proj.index.detach().cpu().clone()  # (heads, head_dim): the layout's, the same for every task
        self.num_heads, self.head_dim = proj.num_heads, proj.head_dim
        flat = self.index.reshape(-1)
        start = int(flat[0]) if flat.numel() else 0
        # all heads' positions in head order: a slice of the Linear's output / input when consecutive, else an index
        self.span = (start, start + flat.numel()) if torch.equal(flat, torch.arange(start, start + flat.numel())) \
            else None
        self.rank = 0  # the widest rank of any task on it (smaller ranks are padded with the table's zero unit)


class BankLinear(nn.Module):
    """One shared Linear (or 1×1 convolution) and every task's LoRA deltas on it, in tables of units.

    A task's factors are stored once, exactly (the active heads only, k-bit ones decoded, the scale folded into B),
    as rows of a few tables: ``a_out`` holds the A rows of its q, k, v projections (C values each); ``bt_<kind>`` the
    rank rows of Bᵀ, head by head (one unit: one head's d values of one rank column); ``ao_<kind>`` and ``bo_<kind>``
    the same for an o projection (units: one head's columns of one A row; one B column). Row 0 of every table is
    zeros. A task's units are consecutive, so a call with one or a few task groups reads them as views: two products
    and one add per projection, as the task's own model does (the q, k, v ones share the first product). A call with
    many groups gathers, per image, its task's units into full-width factors (off heads and missing ranks read the
    zero unit) through small index tables, and runs one batched product per factor for the whole batch: a fixed
    number of operators whatever the number of tasks."""

    # groups in a call from which the batched path runs (docs/research/ECOSYSTEM_BANK.md: the crossover)
    GATHER_FROM = 16

    def __init__(self, base_layer: nn.Module, route: _Route) -> None:
        super().__init__()
        self.base_layer = base_layer
        self._route = route
        self._kinds: dict[str, _Kind] = {}
        self._slots: dict[str, int] = {}  # task -> slot
        # per slot: kind key -> {"r", "heads", "a0", "b0", "rows"}, and for q, k, v "a_rows": the rows of a_out that
        # hold the task's A factors of all its q, k, v projections (consecutive: they share one product)
        self._plans: list[dict[str, dict[str, Any]]] = []
        # rows appended since the tables were last joined (joined before any read: adding many tasks copies each
        # table once, not once per task), the rows each table will have, and whether the routing tables are old
        self._pending: dict[str, list[torch.Tensor]] = {}
        self._rows: dict[str, int] = {}
        self._stale = False
        self._order: Sequence[str] = ()
        self._names = 0  # a counter for the names of row-index buffers
        w = base_layer.weight
        self.register_buffer("a_out", w.new_zeros(1, w.shape[1]))
        self.register_buffer("slot_of_task", torch.zeros(0, dtype=torch.long, device=w.device))

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    # --- loading -----------------------------------------------------------------------------------------------
    def _table(self, name: str, width: int) -> torch.Tensor:
        if not hasattr(self, name):
            self.register_buffer(name, self.a_out.new_zeros(1, width))
        return getattr(self, name)

    def _append(self, name: str, units: torch.Tensor) -> int:
        """Append ``units`` (n × width) to a table (joined at the next read, or once the rows waiting are as many
        as the table's: each row is copied a bounded number of times, and few small blocks wait); returns the row
        of the first."""
        table = self._table(name, units.shape[1])
        start = self._rows.get(name, table.shape[0])
        self._pending.setdefault(name, []).append(units.to(table))
        self._rows[name] = start + units.shape[0]
        if self._rows[name] >= 2 * table.shape[0]:
            self._join(name)
        return start

    def _join(self, name: str) -> None:
        chunks = self._pending.get(name)
        if chunks:
            setattr(self, name, torch.cat([getattr(self, name), *chunks]))
        self._pending[name] = []

    def settle(self) -> None:
        """Join the rows appended since the last call to their tables, and rebuild the routing tables if tasks
        came or went: before anything reads the tables."""
        self._join_pending()
        if self._stale:
            self._reindex()
            empty = len(self._plans)
            self.slot_of_task = torch.tensor([self._slots.get(t, empty) for t in self._order], dtype=torch.long,
                                             device=self.a_out.device)
            self._stale = False

    def _join_pending(self) -> None:
        for name in list(self._pending):
            self._join(name)
        self._pending = {}

    def add_task(self, task: str, projs: Sequence[HeadLoRAProjection]) -> int:
        """Store one task's active projections on this Linear; returns the bytes it adds (factors and the row or
        column index of a projection whose heads are not consecutive)."""
        plan: dict[str, dict[str, Any]] = {}
        added = 0
        for p in projs:
            heads = p.active_heads()
            if not heads:
                continue
            index = p.index.detach().cpu()
            kind = next((k for k in self._kinds.values() if k.target == p.target and torch.equal(k.index, index)),
                        None)
            if kind is None:  # the first of this target, or another layout of it: its own kind
                key = p.target if p.target not in self._kinds else f"{p.target}{len(self._kinds)}"
                kind = self._kinds[key] = _Kind(key, p)
            key = kind.key
            a, b = (w.detach().float() for w in p.effective_weights())
            r, n, d = int(a.shape[0]), len(heads), kind.head_dim
            kind.rank = max(kind.rank, r)
            entry: dict[str, Any] = {"r": r, "heads": heads}
            if kind.out_side:  # A (r × C) shared by the heads; B (n·d × r) head by head
                entry["a0"] = self._append("a_out", a)
                units = (b * float(p.scale)).reshape(n, d, r).permute(2, 0, 1).reshape(r * n, d)
                entry["b0"] = self._append(f"bt_{key}", units)
                added += (a.numel() + units.numel()) * self.a_out.element_size()
            else:  # A (r × n·d) head by head; B (out × r) shared
                entry["a0"] = self._append(f"ao_{key}", a.reshape(r * n, d))
                entry["b0"] = self._append(f"bo_{key}", (b * float(p.scale)).t())
                added += (a.numel() + b.numel()) * self.a_out.element_size()
            rows = p._rows.detach()
            start = int(rows[0])
            if p._covers_all:
                entry["rows"] = None
            elif kind.out_side and torch.equal(rows.cpu(), torch.arange(start, start + rows.numel())):
                entry["rows"] = (start, start + rows.numel())  # consecutive heads: a slice, no index
            elif kind.out_side and kind.span is not None:
                # whole heads of a layout laid out head by head: the deltas are added head by head (an index of
                # heads, not of rows: one block of head_dim values per head, not one column per row)
                entry["rows"], entry["heads_at"] = kind.span, f"heads{self._names}_{key}"
                self._names += 1
                heads_t = torch.tensor(heads, dtype=torch.long, device=self.a_out.device)
                self.register_buffer(entry["heads_at"], heads_t)
                added += heads_t.numel() * heads_t.element_size()
            else:
                entry["rows"] = f"rows{self._names}_{key}"
                self._names += 1
                self.register_buffer(entry["rows"], rows.to(self.a_out.device).clone())
                added += rows.numel() * rows.element_size()
            plan[key] = entry
        out_side = [e for k, e in plan.items() if self._kinds[k].out_side]
        for e in out_side:
            e["a_rows"] = (out_side[0]["a0"], out_side[0]["a0"] + sum(v["r"] for v in out_side))
        if plan:
            self._slots[task] = len(self._plans)
            self._plans.append(plan)
            self._stale = True
        return added

    def snapshot(self) -> tuple[Any, ...]:
        """What :meth:`restore` needs to undo the tasks added after this call (tables are replaced, never
        changed in place, so keeping the old tensors is enough)."""
        return (dict(self._buffers), dict(self._kinds), {k: v.rank for k, v in self._kinds.items()},
                dict(self._slots), list(self._plans), {k: list(v) for k, v in self._pending.items()},
                dict(self._rows))

    def restore(self, state: tuple[Any, ...]) -> None:
        buffers, kinds, ranks, slots, plans, pending, rows = state
        self._buffers.clear()
        self._buffers.update(buffers)
        self._kinds, self._slots, self._plans, self._pending, self._rows = kinds, slots, plans, pending, rows
        for k, kind in kinds.items():
            kind.rank = ranks[k]
        self._stale = True

    def compact(self) -> None:
        """Drop the rows of tasks no route reaches any more (:meth:`forget`): the tables keep the live tasks' rows
        only, in their order, and the freed memory goes back."""
        self._join_pending()  # the routing is rebuilt once, at the end (or by the next settle when nothing moves)
        if len(self._slots) == len(self._plans):
            return
        index: dict[str, list[torch.Tensor]] = {n: [torch.zeros(1, dtype=torch.long)] for n in self._rows}
        count = dict.fromkeys(self._rows, 1)

        def move(name: str, start: int, n: int) -> int:
            index[name].append(torch.arange(start, start + n))
            count[name] += n
            return count[name] - n

        plans, slots, keep = [], {}, set()
        for task, old in sorted(self._slots.items(), key=lambda item: item[1]):
            plan = {k: dict(e) for k, e in self._plans[old].items()}
            out_side = [k for k in plan if self._kinds[k].out_side]
            if out_side:
                lo, hi = plan[out_side[0]]["a_rows"]
                base = move("a_out", lo, hi - lo)
                for k in out_side:
                    e = plan[k]
                    e["a0"], e["a_rows"] = base + e["a0"] - lo, (base, base + hi - lo)
                    e["b0"] = move(f"bt_{k}", e["b0"], e["r"] * len(e["heads"]))
            for k, e in plan.items():
                if not self._kinds[k].out_side:
                    e["a0"] = move(f"ao_{k}", e["a0"], e["r"] * len(e["heads"]))
                    e["b0"] = move(f"bo_{k}", e["b0"], e["r"])
            keep.update(e["rows"] for e in plan.values() if isinstance(e["rows"], str))
            keep.update(e["heads_at"] for e in plan.values() if "heads_at" in e)
            slots[task] = len(plans)
            plans.append(plan)
        for name, parts in index.items():
            table = getattr(self, name)
            setattr(self, name, table.index_select(0, torch.cat(parts).to(table.device)))
            self._rows[name] = count[name]
        for name in [n for n in self._buffers if n.startswith(("rows", "heads")) and n not in keep]:
            del self._buffers[name]
        for kind in self._kinds.values():
            kind.rank = max((p[kind.key]["r"] for p in plans if kind.key in p), default=0)
        self._plans, self._slots, self._stale = plans, slots, True
        self.settle()

    def _reindex(self) -> None:
        """The routing tables of the batched path, from every slot's plan: for each slot (and a last, empty one),
        which table rows make its full-width factors."""
        slots = len(self._plans) + 1
        dev = self.a_out.device
        out_kinds = [k for k in self._kinds.values() if k.out_side]
        a_index = torch.zeros(slots, sum(k.rank for k in out_kinds), dtype=torch.long)
        lo = 0
        for kind in self._kinds.values():
            heads, ranks = kind.num_heads, kind.rank
            unit = torch.zeros(slots, ranks, heads, dtype=torch.long)
            cols = torch.zeros(slots, ranks, dtype=torch.long)
            for s, plan in enumerate(self._plans):
                e = plan.get(kind.key)
                if e is None:
                    continue
                r, act = e["r"], torch.tensor(e["heads"])
                j = torch.arange(r)[:, None]
                unit[s, :r, act] = e["b0" if kind.out_side else "a0"] + j * len(e["heads"]) + torch.arange(len(act))
                if kind.out_side:
                    a_index[s, lo:lo + r] = e["a0"] + torch.arange(r)
                else:
                    cols[s, :r] = e["b0"] + torch.arange(r)
            self.register_buffer(f"route_{kind.key}", unit.to(dev))
            if kind.out_side:
                lo += ranks
            else:
                self.register_buffer(f"route_bo_{kind.key}", cols.to(dev))
            if kind.span is None:
                self.register_buffer(f"full_{kind.key}", kind.index.reshape(-1).to(dev))
        self.register_buffer("route_a", a_index.to(dev))

    def forget(self, task: str) -> None:
        """No route reaches ``task``'s slot any more (its rows stay in the tables until :meth:`compact`)."""
        self._slots.pop(task, None)

    def set_tasks(self, order: Sequence[str]) -> None:
        """The bank's task order (the route's row labels) -> this Linear's slots (at the next :meth:`settle`);
        tasks without deltas here read the empty slot."""
        self._order, self._stale = order, True

    def _factor_tables(self) -> list[torch.Tensor]:
        self.settle()
        return [t for n, t in self.named_buffers(recurse=False) if n == "a_out" or n.startswith(("bt_", "ao_", "bo_"))]

    def routing_bytes(self) -> int:
        """Bytes of the batched path's index tables and of every factor table's zero row."""
        self.settle()
        zero_rows = sum(t.shape[1] * t.element_size() for t in self._factor_tables())
        return zero_rows + sum(t.numel() * t.element_size() for n, t in self.named_buffers(recurse=False)
                               if n.startswith(("route_", "full_")) or n == "slot_of_task")

    def factor_bytes(self) -> int:
        """Bytes of the stored factors (every table less its zero row)."""
        return sum((t.shape[0] - 1) * t.shape[1] * t.element_size() for t in self._factor_tables())

    # --- running -----------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if not self._plans:
            return y
        if self._stale or self._pending:
            self.settle()
        conv = isinstance(self.base_layer, nn.Conv2d)
        if conv:  # channels last, so the deltas are added as for a Linear (HeadLoRAConv1x1 does the same)
            x, y = x.movedim(1, -1), y.movedim(1, -1)
        out = y.contiguous()  # the base output is this call's own tensor: the deltas are added to it in place
        groups = list(self._route.slices(x.shape[0], "an adapted projection"))
        if len(groups) >= self.GATHER_FROM:
            self._add_gathered(out, x)
        else:
            for task, rows in groups:
                slot = self._slots.get(task)
                if slot is not None:
                    ys = out[rows].view(-1, out.shape[-1])  # a slice of whole images of a contiguous tensor: a view
                    self._add_slot(ys, x[rows].reshape(-1, x.shape[-1]), self._plans[slot])
        return out.movedim(-1, 1) if conv else out

    def _add_slot(self, y: torch.Tensor, x: torch.Tensor, plan: dict[str, dict[str, Any]]) -> None:
        """One task's deltas on 2-D ``y`` (in place), from views of its units."""
        h = None
        lo = 0
        for key, e in plan.items():
            kind = self._kinds[key]
            r, n, d = e["r"], len(e["heads"]), kind.head_dim
            if kind.out_side:
                if h is None:  # q, k, v share one product with their A rows
                    h = x @ _as(self.a_out[e["a_rows"][0]:e["a_rows"][1]], x).t()
                bt = getattr(self, f"bt_{key}")[e["b0"]:e["b0"] + r * n].view(r, n * d)
                delta = h[:, lo:lo + r] @ _as(bt, x)
                if "heads_at" in e:
                    _add_heads(y, delta, e["rows"], getattr(self, e["heads_at"]), d)
                else:
                    _add_rows(y, delta, e["rows"], self)
                lo += r
            else:
                a = getattr(self, f"ao_{key}")[e["a0"]:e["a0"] + r * n].view(r, n * d)
                xa = x if e["rows"] is None else x.index_select(1, getattr(self, e["rows"]))
                bo = getattr(self, f"bo_{key}")[e["b0"]:e["b0"] + r]
                _add_rows(y, (xa @ _as(a, x).t()) @ _as(bo, x), None, self)

    def _add_gathered(self, out: torch.Tensor, x: torch.Tensor) -> None:
        """Every row's deltas at once: per image, its slot's full-width factors gathered from the tables, then one
        batched product per factor."""
        images = self._route.batch
        slots = self.slot_of_task.index_select(0, self._route.row_tasks)
        x3 = x.reshape(images, -1, x.shape[-1])
        y3 = out.view(images, -1, out.shape[-1])
        h = None
        lo = 0
        for key, kind in self._kinds.items():
            width = kind.num_heads * kind.head_dim
            units = getattr(self, f"route_{key}").index_select(0, slots).view(-1)
            if kind.out_side:
                if h is None:
                    rows = self.route_a.index_select(0, slots).view(-1)
                    a = self.a_out.index_select(0, rows).view(images, -1, x.shape[-1])
                    h = torch.bmm(x3, _as(a, x).transpose(1, 2))
                bt = getattr(self, f"bt_{key}").index_select(0, units).view(images, kind.rank, width)
                d = torch.bmm(h[..., lo:lo + kind.rank], _as(bt, x))
                lo += kind.rank
                _add_rows(y3, d, kind.span or f"full_{key}", self)
            else:
                a = getattr(self, f"ao_{key}").index_select(0, units).view(images, kind.rank, width)
                if kind.span == (0, x.shape[-1]):
                    xa = x3
                elif kind.span:
                    xa = x3[..., kind.span[0]:kind.span[1]]
                else:
                    xa = x3.index_select(2, getattr(self, f"full_{key}"))
                cols = getattr(self, f"route_bo_{key}").index_select(0, slots).view(-1)
                bo = getattr(self, f"bo_{key}").index_select(0, cols).view(images, kind.rank, -1)
                _add_rows(y3, torch.bmm(torch.bmm(xa, _as(a, x).transpose(1, 2)), _as(bo, x)), None, self)


def _as(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == like.dtype else t.to(like.dtype)


def _add_rows(y: torch.Tensor, d: torch.Tensor, rows: tuple[int, int] | str | None, owner: nn.Module) -> None:
    """``y[..., rows] += d`` in place: all of the last dimension, a slice of it, or the positions in buffer ``rows``.
    Under autocast the products come out in half precision whatever ``y`` is."""
    d = d if d.dtype == y.dtype else d.to(y.dtype)
    if rows is None:
        y.add_(d)
    elif isinstance(rows, tuple):
        y[..., rows[0]:rows[1]].add_(d)
    else:
        y.index_add_(y.dim() - 1, getattr(owner, rows), d)


def _add_heads(y: torch.Tensor, d: torch.Tensor, span: tuple[int, int], heads: torch.Tensor, head_dim: int) -> None:
    """``y[..., span]`` seen as (heads, head_dim) blocks: the blocks of ``heads`` += ``d``'s blocks, in place."""
    d = d if d.dtype == y.dtype else d.to(y.dtype)
    lead = y.shape[:-1]
    y[..., span[0]:span[1]].view(*lead, -1, head_dim).index_add_(len(lead), heads, d.view(*lead, -1, head_dim))


class BankModule(nn.Module):
    """A saved module (the classifier) with one copy per task; tasks without their own copy use the backbone's.
    Outputs are padded with zeros along the last dimension to the widest task, so groups with different class
    counts fit one tensor."""

    def __init__(self, base: nn.Module, route: _Route) -> None:
        super().__init__()
        self.base = base
        # a list, not a ModuleDict keyed by task: task names may hold "." or be a Module attribute ("train")
        self.copies = nn.ModuleList()
        self._index: dict[str, int] = {}  # task -> its place in copies
        self._route = route

    def add(self, task: str, module: nn.Module) -> None:
        self._index[task] = len(self.copies)
        self.copies.append(module)

    def remove(self, task: str) -> None:
        """Drop ``task``'s copy (the copies after it move up one place)."""
        i = self._index.pop(task, None)
        if i is None:
            return
        del self.copies[i]
        self._index = {t: j - (j > i) for t, j in self._index.items()}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = []
        for task, rows in self._route.slices(x.shape[0], "a task's classifier"):
            i = self._index.get(task)
            module = self.base if i is None else self.copies[i]
            parts.append(module(x[rows]))
        width = max(p.shape[-1] for p in parts)
        return torch.cat([nn.functional.pad(p, (0, width - p.shape[-1])) for p in parts])


@dataclass
class BankTask:
    """One adapter in the bank: its name, class names, file, adapter settings and byte counts."""

    name: str
    class_names: list[str]
    path: str
    num_classes: int
    img_size: int | None
    bits: int
    heads_on: int
    heads_total: int
    adapter_bytes: int  # as stored in the file (k-bit codes and constants)
    resident_bytes: int  # what it holds in memory: decoded factors, their row/column indices, its classifier copy
    # (counted when the task was added, at the bank's dtype then: a bank cast later, .half() say, holds less)
    info: dict[str, Any] = field(repr=False, default_factory=dict)


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, attr, module)


class AdapterBank:
    """Many adapter files for the same backbone, run together: ``bank(images, tasks=[...])`` gives each row the
    logits of its own task (a list of 1-D tensors, since tasks have different class counts), with one copy of the
    frozen backbone and without merging.

    >>> import heartlora as hl
    >>> bank = hl.AdapterBank(hl.create_backbone("vit_tiny_patch16_224", num_classes=10, img_size=32,
    ...                                          pretrained=False))          # doctest: +SKIP
    >>> bank.add("runs/mnist/adapter.safetensors"); bank.add("runs/svhn/adapter.safetensors")  # doctest: +SKIP
    >>> logits = bank(images, tasks=["mnist", "svhn", "mnist"])               # doctest: +SKIP

    ``img_size``: the image size the bank's inputs have; a file trained at another size is refused when added (a
    backbone that interpolates its position embeddings would take it, and answer wrongly). None: not checked.
    """

    def __init__(self, backbone: nn.Module, device: torch.device | str | None = None,
                 img_size: int | None = None) -> None:
        if is_adapted(backbone):
            raise ConfigError("this backbone already has heartlora adapters: give the bank a fresh backbone")
        self.model = backbone.eval()
        if device is not None:
            self.model.to(device)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.tasks: dict[str, BankTask] = {}
        self.img_size = img_size
        self._route = _Route()
        self._linears: dict[str, BankLinear] = {}
        self._saved: dict[str, BankModule] = {}
        # one call, add or remove at a time (the route is shared state); re-entered by a folder bank's loads
        self._lock = threading.RLock()
        self._fingerprints: dict[tuple[Any, ...], str] = {}  # the backbone's, per classifier skipped and dtype
        self._verified: set[str] = set()  # adapter configurations attach has proved live on this backbone

    # --- loading -----------------------------------------------------------------------------------------------
    @contextmanager
    def _plain(self) -> Iterator[None]:
        """The backbone as it was built (bank wrappers taken out) for the duration, then wrapped again."""
        for name, m in self._linears.items():
            _set_module(self.model, name, m.base_layer)
        for name, m in self._saved.items():
            _set_module(self.model, name, m.base)
        try:
            yield
        finally:
            self._install()

    def _fingerprint(self, saved: tuple[str, ...]) -> str:
        """The plain backbone's fingerprint with the modules ``saved`` skipped, computed once per dtype."""
        dtype = next((str(p.dtype) for p in self.model.parameters() if p.is_floating_point()), "")
        known = (saved, dtype)
        if known not in self._fingerprints:
            with self._plain():
                self._fingerprints[known] = backbone_fingerprint(self.model, skip=saved)
        return self._fingerprints[known]

    def _install(self) -> None:
        for name, m in {**self._linears, **self._saved}.items():
            _set_module(self.model, name, m)

    def add(self, path: str | os.PathLike, name: str | None = None, class_names: Sequence[str] | None = None,
            check_fingerprint: bool = True) -> BankTask:
        """Load one adapter file. ``name`` defaults to the task the file was trained on (its run facts), else the
        file's folder or stem; ``class_names`` to the file's. Refuses a file for another backbone (fingerprint), a
        name already in the bank, and backbones whose attention reads the adapted weight directly. The backbone's
        fingerprint is computed once, and attach's live-adapter probe runs once per adapter configuration."""
        with self._lock:  # not while a call routes rows
            return self._add(path, name, class_names, check_fingerprint)

    def _add(self, path: str | os.PathLike, name: str | None, class_names: Sequence[str] | None,
             check_fingerprint: bool, contents: AdapterContents | None = None, own_file: bool = False) -> BankTask:
        """``own_file``: a folder bank loading the file of its folder that names the task (the name is its)."""
        path = adapter_file(path)  # a run folder stands for its adapter.safetensors
        contents = contents if contents is not None else read_adapter(path)  # a folder bank has read it already
        info = contents[0]  # the file is read once: its metadata and weights cannot come from two versions of it
        self.check_img_size(path, info)
        run = (info.get("extra") or {}).get(RUN_KEY) or {}
        name = name or trained_task(info) or (path.parent.name if path.stem == "adapter" else path.stem)
        if name in self.tasks or (not own_file and self.has_task(name)):  # a folder bank's files too, loaded or not
            where = self.tasks[name].path if name in self.tasks else "a file of its folder"
            raise ConfigError(f"the bank already holds a task named {name!r} ({where}): give this adapter another "
                              "name")
        saved = tuple(info["modules_to_save"])
        params = list(self.model.parameters())
        fingerprint = self._fingerprint(saved)
        cast = next((p.dtype for p in params if p.is_floating_point()), torch.float32)
        if check_fingerprint and cast != torch.float32 and info.get("fingerprint") not in (None, fingerprint):
            raise AdapterFileError(f"{path} does not match the bank's backbone, whose weights are {cast}: the "
                                   "fingerprint reads the weights as they are, so add adapters to a float32 bank and "
                                   "cast it after (bank.model.to(dtype))")
        with self._plain():
            originals = {s: self.model.get_submodule(s) for s in saved if _has(self.model, s)}
            heads = set(find_classifier(self.model))  # only a classifier takes the task's class count
            for s, m in originals.items():  # the file's saved modules load into copies; the backbone keeps its own
                _set_module(self.model, s, _fresh_copy(m, info["backbone"].get("num_classes") if s in heads else None))
            setting = json.dumps(info["config"], sort_keys=True)
            try:
                model = load_adapter(self.model, path, check_fingerprint=check_fingerprint,
                                     verify=setting not in self._verified, fingerprint=fingerprint, contents=contents)
                self._verified.add(setting)
                wrappers = {n: m for n, m in model.named_modules() if isinstance(m, HeadLoRALinear)}
                weight_mode = sorted(n for n, m in wrappers.items() if m.mode != "forward")
                copies = {s: self.model.get_submodule(s) for s in originals}
                remove_adapters(model)
            finally:
                for s, m in originals.items():
                    _set_module(self.model, s, m)
                for p in params:
                    p.requires_grad_(False)
        if weight_mode:
            raise UnsupportedBackboneError(f"the attention of {weight_mode[0]} reads its adapted weight directly, so "
                                           "rows cannot have different adapters: load each adapter into its own "
                                           "model (heartlora.load_adapter)")
        masks = [m for layer in info["layers"] for m in layer["head_mask"]]
        spec = info["backbone"]
        num = spec.get("num_classes") or _out_features(copies)
        names = list(class_names) if class_names is not None else list(run.get("class_names") or [])
        if names and num and len(names) != num:
            raise ConfigError(f"{len(names)} class names given for the {num} classes of {path}")
        for wname, wrapper in wrappers.items():
            known = self._linears.get(wname)
            if known is not None and known.base_layer is not wrapper.base_layer:
                raise UnsupportedBackboneError(f"loading {path} replaced the Linear {wname}: the bank cannot share it")
        # checked: from here on the task is added whole, or (on any error) not at all
        linears, saved = dict(self._linears), dict(self._saved)
        states = {n: m.snapshot() for n, m in self._linears.items()}
        added_to: list[BankModule] = []
        try:
            resident = 0
            for wname, wrapper in wrappers.items():
                bank_linear = self._linears.get(wname)
                if bank_linear is None:
                    bank_linear = BankLinear(wrapper.base_layer, self._route)
                    self._linears[wname] = bank_linear
                resident += bank_linear.add_task(name, list(wrapper.lora.values()))
            for s, module in copies.items():
                holder = self._saved.get(s)
                if holder is None:
                    holder = BankModule(originals[s], self._route)
                    self._saved[s] = holder
                holder.add(name, module.eval().requires_grad_(False))
                added_to.append(holder)
                resident += sum(t.numel() * t.element_size() for t in _unique_tensors(module))
            for bank_linear in self._linears.values():
                bank_linear.set_tasks([*self.tasks, name])
            self._install()
        except BaseException:
            for holder in added_to:
                holder.remove(name)
            for n, state in states.items():
                self._linears[n].restore(state)
            for n, m in self._linears.items():  # wrappers made for this task only: the plain modules back
                if n not in linears:
                    _set_module(self.model, n, m.base_layer)
            for n, m in self._saved.items():
                if n not in saved:
                    _set_module(self.model, n, m.base)
            self._linears, self._saved = linears, saved
            for bank_linear in self._linears.values():
                bank_linear.set_tasks(list(self.tasks))
            self._install()
            raise
        task = BankTask(name, names or [str(i) for i in range(num or 0)], str(path), int(num or 0),
                        trained_img_size(info), int(info["config"].get("bits", 32)),
                        sum(masks), len(masks), int(info["adapter_bytes"]), resident, info)
        self.tasks[name] = task
        return task

    def serve_at(self, img_size: int) -> None:
        """A server resizes every image to ``img_size``: the bank takes that size when it has none and refuses
        another, and its tasks (and every adapter added later) must have been trained at it."""
        if self.img_size is None:
            self.img_size = int(img_size)
        elif int(self.img_size) != int(img_size):
            raise ConfigError(f"the bank runs {self.img_size} px and the server would resize images to {img_size} px: "
                              "serve the bank at its img_size")
        for task in list(self.tasks.values()):
            self.check_img_size(task.path, task.info)

    def check_img_size(self, path: str | os.PathLike, info: dict[str, Any]) -> None:
        """Refuse adapter file ``path`` (its ``read_adapter_info``) when it was trained at another image size than
        the bank's ``img_size``."""
        size = trained_img_size(info)
        if self.img_size and size and int(size) != int(self.img_size):
            raise ConfigError(f"{path} was trained at {size} px, and this bank runs {self.img_size} px: serve it from "
                              "a bank of its own image size")

    def remove(self, name: str) -> BankTask:
        """Take task ``name`` out of the bank: its rows are no longer accepted, and its factors and classifier copy
        are freed (the shared tables are compacted). Returns the task removed."""
        with self._lock:  # not while a call routes rows
            if name not in self.tasks:
                raise ConfigError(f"unknown task {name!r}: the bank holds {', '.join(self.tasks) or 'no tasks'}")
            removed = self._drop([name])[0]
        return removed

    def _drop(self, names: Sequence[str]) -> list[BankTask]:
        """Take ``names`` out and compact the tables once (the lock held)."""
        removed = [self.tasks.pop(name) for name in names]
        order = list(self.tasks)
        for holder in self._saved.values():
            for name in names:
                holder.remove(name)
        for bank_linear in self._linears.values():
            for name in names:
                bank_linear.forget(name)
            bank_linear.set_tasks(order)
            bank_linear.compact()
        return removed

    # --- which tasks: a plain bank holds them all; a folder bank (heartlora.bank_folder) loads them on first use --
    def has_task(self, name: str) -> bool:
        """Whether a call may name ``name``."""
        return name in self.tasks

    def served_from_folder(self, name: str) -> bool:
        """Whether task ``name`` is answered from a file in a served folder (never, here: see FolderBank)."""
        return False

    def available(self) -> list[str]:
        """Every task a call may name (a folder bank: those in memory and those in its folder)."""
        return list(self.tasks)

    def unknown(self, name: str) -> str:
        """The one-line error for a task the bank cannot run."""
        if not self.tasks:
            return "the bank holds no adapters: add adapter files with bank.add(path)"
        return f"unknown task {name!r}: the bank holds {', '.join(self.tasks)}"

    def ensure(self, tasks: Sequence[str]) -> dict[str, str]:
        """Make ``tasks`` ready for a call; returns ``{task: one-line reason}`` for those that cannot run. A plain
        bank loads nothing; a folder bank loads what is missing and evicts within its budget."""
        return {t: self.unknown(t) for t in dict.fromkeys(tasks) if t not in self.tasks}

    # --- running -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, images: torch.Tensor, tasks: Sequence[str]) -> list[torch.Tensor]:
        """Logits of each row under its own task's adapter and classifier: a list of ``len(images)`` 1-D tensors
        (length: that task's class count). ``tasks`` may be one name for every row."""
        tasks = self._row_tasks(images, tasks)
        if not self.tasks and not self.available():
            raise ConfigError(self.unknown(""))
        with self._lock:  # the tasks loaded here stay until the call is done
            failed = self.ensure(tasks)
            if failed:
                raise ConfigError(failed[min(failed)])
            return self._run(images, tasks)

    @staticmethod
    def _row_tasks(images: torch.Tensor, tasks: Sequence[str] | str) -> list[str]:
        if not isinstance(images, torch.Tensor):  # its dtype and shape: the backbone's own check, in one line
            raise ConfigError(f"images must be one float tensor (batch, 3, height, width) in [0, 1], got a "
                              f"{type(images).__name__}: torch.stack them")
        if not isinstance(tasks, str) and not (isinstance(tasks, Sequence) and all(isinstance(t, str) for t in tasks)):
            raise ConfigError(f"tasks must be a task name or one name per row, got {type(tasks).__name__}")
        tasks = [tasks] * len(images) if isinstance(tasks, str) else list(tasks)
        if len(tasks) != len(images):
            raise ConfigError(f"{len(tasks)} task names for {len(images)} images: give one task per row")
        return tasks

    def _settle(self) -> None:
        """Every shared Linear's tables and routing brought up to date with the tasks added and removed."""
        for bank_linear in self._linears.values():
            bank_linear.settle()

    def _run(self, images: torch.Tensor, tasks: Sequence[str]) -> list[torch.Tensor]:
        if not len(images):
            return []
        side = tuple(images.shape[-2:])
        for name in dict.fromkeys(tasks):  # a backbone that interpolates its position embeddings takes any size,
            size = self.img_size or self.tasks[name].img_size  # and answers wrongly
            if size and side != (int(size), int(size)):
                raise ConfigError(f"the images are {side[0]}×{side[1]} px and task {name!r} runs at {size} px: resize "
                                  f"them to {size} (heartlora.read_image(path, {size}) does)")
        weight = next((p for p in self.model.parameters() if p.is_floating_point()), None)
        if weight is not None and images.device != weight.device:  # a server decodes on the CPU; the model may
            images = images.to(weight.device)  # be on a GPU
        if weight is not None and images.is_floating_point() and images.dtype != weight.dtype:
            images = images.to(weight.dtype)  # float32 images, a model cast to bfloat16 (uint8 is refused below)
        order_of = {t: i for i, t in enumerate(self.tasks)}
        order = sorted(range(len(tasks)), key=lambda i: order_of[tasks[i]])  # stable: rows of a task stay in order
        groups: list[tuple[str, int, int]] = []
        for pos, i in enumerate(order):
            if groups and groups[-1][0] == tasks[i]:
                groups[-1] = (tasks[i], groups[-1][1], pos + 1)
            else:
                groups.append((tasks[i], pos, pos + 1))
        index = torch.tensor(order, device=images.device)
        row_tasks = torch.tensor([order_of[tasks[i]] for i in order], device=images.device)
        self._settle()
        self._route.batch, self._route.groups, self._route.row_tasks = len(images), groups, row_tasks
        try:
            out = self.model(images.index_select(0, index))
        finally:
            self._route.batch, self._route.groups = 0, []
        result: list[torch.Tensor] = [torch.empty(0)] * len(images)
        for pos, i in enumerate(order):
            result[i] = out[pos, :self.tasks[tasks[i]].num_classes or out.shape[1]]
        return result

    def top_k(self, images: torch.Tensor, tasks: Sequence[str], k: int = 5) -> list[list[dict[str, Any]]]:
        """Per row, the ``k`` most probable labels of its task: ``{"label", "index", "prob"}`` each."""
        _check_k(k)
        tasks = self._row_tasks(images, tasks)
        with self._lock:  # a folder bank keeps the tasks of this call until their names are read
            logits_of = self(images, tasks)
            names_of = {t: self.tasks[t].class_names for t in tasks}
        return _ranked(logits_of, tasks, names_of, k)

    @torch.no_grad()
    def answer(self, images: torch.Tensor, tasks: Sequence[str], k: int = 5) -> list[list[dict[str, Any]] | str]:
        """Per row, its task's ``k`` top labels as :meth:`top_k` gives them, or, for a row whose task cannot run
        (unknown, or its file refused), the one-line reason: the rows of the other tasks are still answered. What
        a server does with one batch of several clients' requests; the tasks are made ready once, under the lock
        that keeps them until their rows are run."""
        _check_k(k)
        tasks = self._row_tasks(images, tasks)
        with self._lock:
            failed = self.ensure(tasks)
            live = [i for i, t in enumerate(tasks) if t not in failed]
            live_tasks = [tasks[i] for i in live]
            rows = images if len(live) == len(tasks) else images[live]
            logits_of = self._run(rows, live_tasks) if live else []
            names_of = {t: self.tasks[t].class_names for t in live_tasks}
        tops = iter(_ranked(logits_of, live_tasks, names_of, k))
        return [failed[t] if t in failed else next(tops) for t in tasks]

    # --- memory ------------------------------------------------------------------------------------------------
    def backbone_bytes(self) -> int:
        """Bytes of the shared backbone's parameters and buffers (adapters, routing tables and task classifiers
        excluded)."""
        with self._lock:  # not while an add or a remove changes the tables
            skip = {id(t) for m in self._linears.values() for t in m.buffers(recurse=False)}
            skip |= {id(t) for m in self._saved.values() for t in _unique_tensors(m.copies)}
            return sum(t.numel() * t.element_size() for t in _unique_tensors(self.model) if id(t) not in skip)

    def routing_bytes(self) -> int:
        """Bytes the bank holds beyond the backbone and the tasks' own (``BankTask.resident_bytes``): the index
        tables of the batched path and each factor table's zero row."""
        with self._lock:  # settling the tables while an add queues rows would lose them
            return sum(m.routing_bytes() for m in self._linears.values())

    def resident_bytes(self) -> int:
        """Bytes of every tensor the bank holds: the backbone once, each task's adapters and classifier, and the
        routing tables (``backbone_bytes() + Σ task.resident_bytes + routing_bytes()``)."""
        with self._lock:
            self._settle()
            return sum(t.numel() * t.element_size() for t in _unique_tensors(self.model))

    @classmethod
    def from_folder(cls, backbone: nn.Module, folder: str | os.PathLike, cache_mb: float | None = None,
                    device: torch.device | str | None = None, img_size: int | None = None) -> AdapterBank:
        """A bank serving every adapter file in ``folder`` (``NAME.safetensors`` or ``NAME/adapter.safetensors``:
        task NAME), each loaded on first use, the most recently used kept within ``cache_mb`` MiB: a
        :class:`heartlora.bank_folder.FolderBank`."""
        from heartlora.bank_folder import FolderBank

        return FolderBank(backbone, folder, cache_mb=cache_mb, device=device, img_size=img_size)

    def __repr__(self) -> str:
        return f"AdapterBank({len(self.tasks)} tasks: {', '.join(self.tasks)})"


def trained_task(info: dict[str, Any]) -> str:
    """The task an adapter file (its :func:`heartlora.read_adapter_info`) was trained on, as a bank names it ("" when
    it names none): a VTAB folder's task by the folder's name, not its whole path."""
    task = str((((info.get("extra") or {}).get(RUN_KEY) or {}).get("task")) or "")
    vtab = re.fullmatch(r"vtab:(.+?)(@\d+shot)?", task)
    return Path(vtab.group(1)).name + (vtab.group(2) or "") if vtab else task


def trained_img_size(info: dict[str, Any]) -> int | None:
    """The image size an adapter file (its :func:`heartlora.read_adapter_info`) was trained at, where it says."""
    return run_img_size({"run": (info.get("extra") or {}).get(RUN_KEY) or {}, "adapter": info})


def _check_k(k: int) -> None:
    if k < 1:
        raise ConfigError(f"top_k must be at least 1, got {k}")


def _ranked(logits_of: Sequence[torch.Tensor], tasks: Sequence[str], names_of: dict[str, list[str]],
            k: int) -> list[list[dict[str, Any]]]:
    """Each row's ``k`` most probable labels (``{"label", "index", "prob"}``; a label without a name is its
    index)."""
    rows = []
    for logits, task in zip(logits_of, tasks):
        probs = logits.float().softmax(0)
        values, idx = probs.topk(min(k, probs.numel()))
        names = names_of[task]
        rows.append([{"label": names[j] if j < len(names) else str(j), "index": j, "prob": p}
                     for j, p in zip(idx.tolist(), values.tolist())])
    return rows


def bank_from_files(paths: Sequence[str | os.PathLike], device: torch.device | str = "cpu",
                    backbone: str | None = None) -> tuple[AdapterBank, int]:
    """A bank holding the adapter files ``paths`` (run folders stand for their adapter.safetensors) on the backbone
    the first file names (``backbone`` builds another, as ``load_trained`` does), and the image size they share."""
    files = [Path(p) / "adapter.safetensors" if Path(p).is_dir() else Path(p) for p in paths]
    infos = [read_run_info(f) for f in files]
    plain = [str(f) for f, i in zip(files, infos) if i["kind"] != "adapter"]
    if plain:
        raise ConfigError(f"{plain[0]} stores plain weights (a linear or full run), not an adapter: only adapter "
                          "files share a backbone in a bank")
    sizes = {str(f): run_img_size(info) for f, info in zip(files, infos)}
    if len(set(sizes.values())) > 1:
        raise ConfigError("the adapters were trained at different image sizes "
                          f"({', '.join(f'{f}: {s}' for f, s in sizes.items())}): serve them from separate banks")
    model, size = backbone_for(files[0], backbone, infos[0])
    bank = AdapterBank(model, device=device, img_size=size)
    tasks = [i["run"].get("task") or None for i in infos]
    for f, task in zip(files, tasks):  # two runs of one task: name them by their run folders
        bank.add(f, name=(f.parent.name if f.stem == "adapter" else f.stem) if tasks.count(task) > 1 else None)
    return bank, size


def backbone_for(file: Path, backbone: str | None = None, info: dict[str, Any] | None = None) -> tuple[nn.Module, int]:
    """The backbone adapter ``file`` names (``backbone`` builds another, as ``load_trained`` does) and the image
    size it was trained at; ``info``: the file's ``read_run_info``, when read already."""
    info = info or read_run_info(file)
    if info["kind"] != "adapter":
        raise ConfigError(f"{file} stores plain weights (a linear or full run), not an adapter: only adapter "
                          "files share a backbone in a bank")
    run = dict(info["run"])
    run.setdefault("backbone_spec", info["adapter"]["backbone"])
    if "num_classes" not in run["backbone_spec"]:
        raise ConfigError(f"{file} was saved from a model create_backbone did not build: make the bank in Python "
                          "with heartlora.AdapterBank(your_backbone)")
    model = build_backbone(run, override=backbone, source=str(file))
    size = run_img_size(info) or getattr(model, "img_size", None)
    if not size:
        raise ConfigError(f"{file} names no image size: make the bank in Python and resize images yourself")
    return model, int(size)


def _has(root: nn.Module, name: str) -> bool:
    try:
        root.get_submodule(name)
    except AttributeError:
        return False
    return True


def _fresh_copy(module: nn.Module, num_classes: int | None) -> nn.Module:
    """A copy of a saved module for a task to load its own weights into; given ``num_classes`` (the classifier's),
    a Linear gets the task's class count (tasks differ in it; the fingerprint skips the classifier)."""
    if isinstance(module, nn.Linear) and num_classes and module.out_features != num_classes:
        w = module.weight
        return nn.Linear(module.in_features, int(num_classes), bias=module.bias is not None, device=w.device,
                         dtype=w.dtype)
    return copy.deepcopy(module)


def _out_features(modules: dict[str, nn.Module]) -> int | None:
    for m in modules.values():
        if isinstance(m, nn.Linear):
            return m.out_features
    return None


def _unique_tensors(model: nn.Module) -> list[torch.Tensor]:
    seen: dict[int, torch.Tensor] = {}
    for t in list(model.parameters()) + list(model.buffers()):
        seen.setdefault(id(t), t)
    return list(seen.values())
