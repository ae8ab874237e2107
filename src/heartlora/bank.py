"""Many tasks on one backbone: :class:`AdapterBank` runs a batch whose rows belong to different adapters.

The frozen backbone is held once. Each adapted Linear is wrapped by a :class:`BankLinear` that computes the base
output for the whole batch and then adds, task group by task group, that task's LoRA deltas (PEFT's mixed-adapter
inference: the batch is sorted by task so each group is a contiguous slice). A task's deltas on one Linear are a
:class:`TaskDeltas`: its active projections' factors as the forward uses them (k-bit ones decoded), frozen and laid
out for the fewest operations a call, and nothing else. Each task keeps its own classifier
(the file's ``modules_to_save``); a :class:`BankModule` in the classifier's place runs each group through its task's
copy and pads the outputs to the widest class count, and the bank cuts every row back to its own classes.

Adapters are loaded with :func:`heartlora.load_adapter` itself (fingerprint, integrity and shape checks, k-bit
decoding, heads off), on the backbone restored to its plain state for the moment, and their projections are then
turned into the bank's frozen form: what the bank computes per row is what that task's own loaded model computes, up
to the order of floating-point additions (in float32, a few ulps; in half precision each delta is rounded once more
before it is added, so logits may differ by a few half-precision ulps).
"""

from __future__ import annotations

import copy
import os
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from heartlora.errors import ConfigError, UnsupportedBackboneError
from heartlora.method.layer import HeadLoRALinear, HeadLoRAProjection
from heartlora.method.model import _detach, is_adapted
from heartlora.method.storage import load_adapter, read_adapter_info

RUN_KEY = "heartlora_run"  # the engine's run facts inside an adapter file's extra metadata (task, class names)


class _Route:
    """The current call's task groups, shared by every bank module: ``(task, start, end)`` over the sorted batch."""

    def __init__(self) -> None:
        self.batch = 0
        self.groups: list[tuple[str, int, int]] = []

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


class TaskDeltas(nn.Module):
    """One task's deltas on one shared Linear, frozen for inference. The q, k, v projections (their heads own rows
    of the output) share one product with their A factors stacked, then each adds its own B product to its rows;
    an o projection (its heads own columns of the input) reads its columns and adds to the whole output. Holds the
    factors as the task's own forward uses them (k-bit ones decoded) as frozen parameters, the row and column
    indices as buffers (none for rows of consecutive heads: a slice of the output), and nothing else: no
    optimizer-facing copies, no per-head bookkeeping."""

    def __init__(self, projs: Sequence[HeadLoRAProjection]) -> None:
        super().__init__()
        out_side = [p for p in projs if p.per_head_is_B and p.active_heads()]
        in_side = [p for p in projs if not p.per_head_is_B and p.active_heads()]
        frozen = [(p, *(w.detach() for w in p.effective_weights())) for p in out_side + in_side]
        self.a_out = nn.Parameter(torch.cat([a for _, a, _ in frozen[:len(out_side)]]), requires_grad=False) \
            if out_side else None
        # (A rows from, to, B name, output rows: None (all), a (start, stop) range or an index buffer's name, scale)
        self._out: list[tuple[int, int, str, tuple[int, int] | str | None, float]] = []
        self._in: list[tuple[str, str, str | None, float]] = []  # (A name, B name, columns name, scale)
        lo = 0
        for i, (p, a, b) in enumerate(frozen):
            rows: tuple[int, int] | str | None = None if p._covers_all else f"rows{i}"
            start = int(p._rows[0]) if p._rows.numel() else 0
            if rows and p.per_head_is_B and torch.equal(p._rows, torch.arange(start, start + p._rows.numel(),
                                                                                device=p._rows.device)):
                rows = (start, start + p._rows.numel())  # consecutive heads: a slice of the output, no index
            elif rows:
                self.register_buffer(rows, p._rows.clone())
            setattr(self, f"b{i}", nn.Parameter(b, requires_grad=False))
            if p.per_head_is_B:
                self._out.append((lo, lo + a.shape[0], f"b{i}", rows, float(p.scale)))
                lo += a.shape[0]
            else:
                setattr(self, f"a{i}", nn.Parameter(a, requires_grad=False))
                self._in.append((f"a{i}", f"b{i}", rows, float(p.scale)))

    def __bool__(self) -> bool:  # an empty one (every head off) adds nothing
        return bool(self._out or self._in)

    def add_to(self, y: torch.Tensor, x: torch.Tensor) -> None:
        """``y += Σ scale · x Aᵀ Bᵀ`` on the heads' rows (q, k, v) or from their columns (o), in place; ``y``,
        ``x`` 2-D. Two products per projection (the q, k, v ones share the first) and one add each."""
        if self.a_out is not None:
            a = self.a_out if self.a_out.dtype == x.dtype else self.a_out.to(x.dtype)
            d = x @ a.t()
            for lo, hi, b_name, rows, scale in self._out:
                self._add(y, d[:, lo:hi], getattr(self, b_name), rows, scale)
        for a_name, b_name, cols, scale in self._in:
            xa = x if cols is None else x.index_select(1, getattr(self, cols))
            a = getattr(self, a_name)
            self._add(y, xa @ (a if a.dtype == x.dtype else a.to(x.dtype)).t(), getattr(self, b_name), None, scale)

    def _add(self, y: torch.Tensor, d: torch.Tensor, b: torch.Tensor, rows: tuple[int, int] | str | None,
             scale: float) -> None:
        out = d @ (b if b.dtype == d.dtype else b.to(d.dtype)).t()
        out = out if out.dtype == y.dtype else out.to(y.dtype)  # under autocast the products are half precision
        if rows is None:
            y.add_(out, alpha=scale)
        elif isinstance(rows, tuple):
            y[:, rows[0]:rows[1]].add_(out, alpha=scale)
        else:
            y.index_add_(1, getattr(self, rows), out, alpha=scale)


class BankLinear(nn.Module):
    """One shared Linear (or 1×1 convolution) plus, per task, that task's :class:`TaskDeltas`."""

    def __init__(self, base_layer: nn.Module, route: _Route) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict()  # task -> TaskDeltas
        self._route = route

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        conv = isinstance(self.base_layer, nn.Conv2d)
        if conv:  # channels last, so the deltas are added as for a Linear (HeadLoRAConv1x1 does the same)
            x, y = x.movedim(1, -1), y.movedim(1, -1)
        out = y.contiguous()  # the base output is this call's own tensor: the deltas are added to it in place
        for task, rows in self._route.slices(x.shape[0], "an adapted projection"):
            deltas = self.adapters[task] if task in self.adapters else None  # noqa: SIM401 (ModuleDict has no get)
            if not deltas:
                continue
            ys = out[rows].view(-1, out.shape[-1])  # a slice of whole images of a contiguous tensor: a view
            deltas.add_to(ys, x[rows].reshape(-1, x.shape[-1]))
        return out.movedim(-1, 1) if conv else out


class BankModule(nn.Module):
    """A saved module (the classifier) with one copy per task; tasks without their own copy use the backbone's.
    Outputs are padded with zeros along the last dimension to the widest task, so groups with different class
    counts fit one tensor."""

    def __init__(self, base: nn.Module, route: _Route) -> None:
        super().__init__()
        self.base = base
        self.copies = nn.ModuleDict()  # task -> its module
        self._route = route

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = []
        for task, rows in self._route.slices(x.shape[0], "a task's classifier"):
            module = self.copies[task] if task in self.copies else self.base  # noqa: SIM401 (ModuleDict has no get)
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
    """

    def __init__(self, backbone: nn.Module, device: torch.device | str | None = None) -> None:
        if is_adapted(backbone):
            raise ConfigError("this backbone already has heartlora adapters: give the bank a fresh backbone")
        self.model = backbone.eval()
        if device is not None:
            self.model.to(device)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.tasks: dict[str, BankTask] = {}
        self._route = _Route()
        self._linears: dict[str, BankLinear] = {}
        self._saved: dict[str, BankModule] = {}
        self._lock = threading.Lock()  # one call at a time: the route is shared state

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

    def _install(self) -> None:
        for name, m in {**self._linears, **self._saved}.items():
            _set_module(self.model, name, m)

    def add(self, path: str | os.PathLike, name: str | None = None, class_names: Sequence[str] | None = None,
            check_fingerprint: bool = True) -> BankTask:
        """Load one adapter file. ``name`` defaults to the task the file was trained on (its run facts), else the
        file's folder or stem; ``class_names`` to the file's. Refuses a file for another backbone (fingerprint), a
        name already in the bank, and backbones whose attention reads the adapted weight directly."""
        info = read_adapter_info(path)
        run = (info.get("extra") or {}).get(RUN_KEY) or {}
        path = Path(path)
        name = name or run.get("task") or (path.parent.name if path.stem == "adapter" else path.stem)
        if name in self.tasks:
            raise ConfigError(f"the bank already holds a task named {name!r} ({self.tasks[name].path}): "
                              "give this adapter another name")
        saved = tuple(info["modules_to_save"])
        params = list(self.model.parameters())
        with self._plain():
            originals = {s: self.model.get_submodule(s) for s in saved if _has(self.model, s)}
            for s, m in originals.items():  # the file's classifier loads into a copy; the backbone keeps its own
                _set_module(self.model, s, _fresh_copy(m, info["backbone"].get("num_classes")))
            try:
                model = load_adapter(self.model, path, check_fingerprint=check_fingerprint)
                wrappers = {n: m for n, m in model.named_modules() if isinstance(m, HeadLoRALinear)}
                weight_mode = sorted(n for n, m in wrappers.items() if m.mode != "forward")
                copies = {s: self.model.get_submodule(s) for s in originals}
                _detach(model)
            finally:
                for s, m in originals.items():
                    _set_module(self.model, s, m)
                for p in params:
                    p.requires_grad_(False)
        if weight_mode:
            raise UnsupportedBackboneError(f"the attention of {weight_mode[0]} reads its adapted weight directly, so "
                                           "rows cannot have different adapters: load each adapter into its own "
                                           "model (heartlora.load_adapter)")
        resident = 0
        for wname, wrapper in wrappers.items():
            bank_linear = self._linears.get(wname)
            if bank_linear is None:
                bank_linear = BankLinear(wrapper.base_layer, self._route)
                self._linears[wname] = bank_linear
            elif bank_linear.base_layer is not wrapper.base_layer:
                raise UnsupportedBackboneError(f"loading {path} replaced the Linear {wname}: the bank cannot share it")
            deltas = TaskDeltas(list(wrapper.lora.values()))
            bank_linear.adapters[name] = deltas
            resident += sum(t.numel() * t.element_size() for t in _unique_tensors(deltas))
        for s, module in copies.items():
            holder = self._saved.get(s)
            if holder is None:
                holder = BankModule(originals[s], self._route)
                self._saved[s] = holder
            holder.copies[name] = module.eval().requires_grad_(False)
            resident += sum(t.numel() * t.element_size() for t in _unique_tensors(module))
        self._install()
        masks = [m for layer in info["layers"] for m in layer["head_mask"]]
        spec = info["backbone"]
        num = spec.get("num_classes") or _out_features(copies)
        names = list(class_names) if class_names is not None else list(run.get("class_names") or [])
        if names and num and len(names) != num:
            raise ConfigError(f"{len(names)} class names given for the {num} classes of {path}")
        task = BankTask(name, names or [str(i) for i in range(num or 0)], str(path), int(num or 0),
                        run.get("img_size") or spec.get("img_size"), int(info["config"].get("bits", 32)),
                        sum(masks), len(masks), int(info["adapter_bytes"]), resident, info)
        self.tasks[name] = task
        return task

    # --- running -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, images: torch.Tensor, tasks: Sequence[str]) -> list[torch.Tensor]:
        """Logits of each row under its own task's adapter and classifier: a list of ``len(images)`` 1-D tensors
        (length: that task's class count)."""
        if not self.tasks:
            raise ConfigError("the bank holds no adapters: add adapter files with bank.add(path)")
        if len(tasks) != len(images):
            raise ConfigError(f"{len(tasks)} task names for {len(images)} images: give one task per row")
        unknown = sorted({t for t in tasks if t not in self.tasks})
        if unknown:
            raise ConfigError(f"unknown task {unknown[0]!r}: the bank holds {', '.join(self.tasks)}")
        if not len(images):
            return []
        order_of = {t: i for i, t in enumerate(self.tasks)}
        order = sorted(range(len(tasks)), key=lambda i: order_of[tasks[i]])  # stable: rows of a task stay in order
        groups: list[tuple[str, int, int]] = []
        for pos, i in enumerate(order):
            if groups and groups[-1][0] == tasks[i]:
                groups[-1] = (tasks[i], groups[-1][1], pos + 1)
            else:
                groups.append((tasks[i], pos, pos + 1))
        index = torch.tensor(order, device=images.device)
        with self._lock:
            self._route.batch, self._route.groups = len(images), groups
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
        if k < 1:
            raise ConfigError(f"top_k must be at least 1, got {k}")
        rows = []
        for logits, task in zip(self(images, tasks), tasks):
            probs = logits.float().softmax(0)
            values, idx = probs.topk(min(k, probs.numel()))
            names = self.tasks[task].class_names
            rows.append([{"label": names[j] if j < len(names) else str(j), "index": j, "prob": p}
                         for j, p in zip(idx.tolist(), values.tolist())])
        return rows

    # --- memory ------------------------------------------------------------------------------------------------
    def backbone_bytes(self) -> int:
        """Bytes of the shared backbone's parameters and buffers (adapters and task classifiers excluded)."""
        skip = {id(t) for m in self._linears.values() for t in _unique_tensors(m.adapters)}
        skip |= {id(t) for m in self._saved.values() for t in _unique_tensors(m.copies)}
        return sum(t.numel() * t.element_size() for t in _unique_tensors(self.model) if id(t) not in skip)

    def resident_bytes(self) -> int:
        """Bytes of every tensor the bank holds: the backbone once, plus each task's adapters and classifier."""
        return sum(t.numel() * t.element_size() for t in _unique_tensors(self.model))

    def __repr__(self) -> str:
        return f"AdapterBank({len(self.tasks)} tasks: {', '.join(self.tasks)})"


def bank_from_files(paths: Sequence[str | os.PathLike], device: torch.device | str = "cpu",
                    backbone: str | None = None) -> tuple[AdapterBank, int]:
    """A bank holding the adapter files ``paths`` (run folders stand for their adapter.safetensors) on the backbone
    the first file names (``backbone`` builds another, as ``load_trained`` does), and the image size they share."""
    from heartlora.engine.inference import build_backbone, read_run_info

    files = [Path(p) / "adapter.safetensors" if Path(p).is_dir() else Path(p) for p in paths]
    infos = [read_run_info(f) for f in files]
    plain = [str(f) for f, i in zip(files, infos) if i["kind"] != "adapter"]
    if plain:
        raise ConfigError(f"{plain[0]} stores plain weights (a linear or full run), not an adapter: only adapter "
                          "files share a backbone in a bank")
    sizes = {}
    for f, info in zip(files, infos):
        spec = info["run"].get("backbone_spec") or info["adapter"]["backbone"]
        sizes[str(f)] = info["run"].get("img_size") or spec.get("img_size")
    if len(set(sizes.values())) > 1:
        raise ConfigError("the adapters were trained at different image sizes "
                          f"({', '.join(f'{f}: {s}' for f, s in sizes.items())}): serve them from separate banks")
    run = dict(infos[0]["run"])
    run.setdefault("backbone_spec", infos[0]["adapter"]["backbone"])
    if "num_classes" not in run["backbone_spec"]:
        raise ConfigError(f"{files[0]} was saved from a model create_backbone did not build: make the bank in Python "
                          "with heartlora.AdapterBank(your_backbone)")
    bank = AdapterBank(build_backbone(run, override=backbone, source=str(files[0])), device=device)
    tasks = [i["run"].get("task") or None for i in infos]
    for f, task in zip(files, tasks):  # two runs of one task: name them by their run folders
        bank.add(f, name=(f.parent.name if f.stem == "adapter" else f.stem) if tasks.count(task) > 1 else None)
    size = next(iter(sizes.values())) or getattr(bank.model, "img_size", None)
    if not size:
        raise ConfigError(f"{files[0]} names no image size: make the bank in Python and resize images yourself")
    return bank, int(size)


def _has(root: nn.Module, name: str) -> bool:
    try:
        root.get_submodule(name)
    except AttributeError:
        return False
    return True


def _fresh_copy(module: nn.Module, num_classes: int | None) -> nn.Module:
    """A copy of a saved module for a task to load its own weights into; a Linear classifier gets the task's class
    count (tasks differ in it; the fingerprint skips the classifier)."""
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
