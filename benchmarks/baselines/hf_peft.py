"""The plain recipe a user would pick instead of heartlora, outside heartlora's engine: Hugging Face's own
``Dinov2ForImageClassification`` (its classifier reads the CLS token and the mean patch token), PEFT's LoRA on q and v
(r 8, ``lora_alpha`` 8), torch's AdamW (lr 1e-3, its default weight decay 0.01) with ``OneCycleLR``, batch 32,
mean cross-entropy, no augmentation (a K-shot task trains for at least 100 optimizer steps, as in heartlora). Also a
linear probe on frozen features computed once per task (the same CLS + mean-patch features, a Linear trained on them
with the same optimizer and schedule).

Only the data (``heartlora.data.get_task``: the same splits, images and seeds as every heartlora run) and the offline
DINOv2 weights (``heartlora.backbones.dinov2_offline``) come from heartlora; the model, adapter, loop and schedule are
transformers', PEFT's and torch's. A finished run writes ``metrics.json`` with the keys of heartlora's runs (method
``hf-peft`` or ``linear-probe``), so a suite reads it as one more column.

Any other PEFT method runs the same recipe with ``--method NAME``: the presets in ``PEFT_METHODS`` (LoRA at rank 1,
2, 4 and 8, VeRA, FourierFT, VB-LoRA, IA³, LN tuning, LoHa, LoKr), each at the settings its paper or PEFT's docs
give, and FourierFT, VB-LoRA and IA³ also scaled under 20 KB a task; or ``--method peft:<ConfigClass>`` with
``--peft-kwargs JSON`` for any config PEFT ships (``target_modules`` defaults to q and v). ``--lr`` defaults to the
preset's reference learning rate. Every run reports the bytes a user keeps per task beyond the frozen backbone,
counted one way for every method: the tensors PEFT's ``save_pretrained`` writes (``get_peft_model_state_dict``)
without the classifier, at the precision PEFT stores them (``adapter_bytes``), at fp16 for the float ones
(``adapter_bytes_fp16``), and the classifier apart (``classifier_bytes``, fp32). Tensors regenerated from a stored
seed (VeRA's shared projections, FourierFT's frequency positions) are not counted, since PEFT rebuilds them from
the config.

    python benchmarks/baselines/hf_peft.py --task digits --protocol val --out runs/base/digits-hf-peft
    python benchmarks/baselines/hf_peft.py --task vtab:/data/cifar --method linear-probe --out runs/base/cifar-lp
    python benchmarks/baselines/hf_peft.py --task digits --method vera --lr 3e-3 --out runs/base/digits-vera
    python benchmarks/baselines/hf_peft.py --task digits --method peft:LoraConfig --peft-kwargs '{"r": 2}' --out X

A run keeps ``checkpoint.pt`` in its folder after every epoch but the last (the trainable tensors, the optimizer,
the schedule and torch's random state, behind a sha256 of its bytes): the same command on the same folder resumes
from it and ends with the weights of an uninterrupted run; another command there, or an altered file, is refused.
The checkpoint is removed once ``metrics.json`` is written.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import platform
import re
import time
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

PROTOCOLS = {"val": ("train800", "val200"), "final": ("train800val200", "test")}
MIN_FEWSHOT_STEPS = 100  # as heartlora's engine: a K-shot task trains for at least this many optimizer steps
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
LINEAR_PROBE_LR = 1e-3  # the linear probe's learning rate (the plain recipe's, as hf-peft's reference)


WEIGHT_DECAY = 0.01  # AdamW's default, on every trained tensor but a ``no_decay`` preset's own


def _find(model: nn.Module, leaf: tuple[str, ...], cls: type = nn.Linear, inside: str = ".encoder.") -> list[str]:
    """Full names of the modules of type ``cls`` under the encoder whose last name part is one of ``leaf``."""
    names = [n for n, m in model.named_modules() if isinstance(m, cls) and inside in n and n.rsplit(".", 1)[-1] in leaf]
    if not names:
        raise SystemExit(f"no {'/'.join(leaf)} modules found in {type(model).__name__}")
    return names


def _qv(model: nn.Module) -> list[str]:
    return _find(model, ("query", "value", "q_proj", "v_proj"))


def _lora(r: int) -> dict[str, Any]:
    # PEFT's default lora_alpha (8) at every rank: the plain recipe a user gets by changing r alone
    return {"cls": "LoraConfig", "kwargs": lambda m: {"r": r, "lora_alpha": 8, "target_modules": _qv(m),
                                                      "bias": "none"},
            "lr": 1e-3, "settings": f"LoRA r{r} on q and v, lora_alpha 8 (PEFT's default), no dropout"}


def _fourierft(n: int, settings: str) -> dict[str, Any]:
    # The FourierFT authors' ViT runs train the spectrum at 0.2 to 0.3 and the classifier at 8e-4 to 1e-3 (two
    # AdamW groups, scaling 300): the spectrum's rate is searched from 0.2, the classifier stays at 1e-3.
    # The spectrum starts at zero (PEFT's init_weights=True), not at PEFT's default standard normal: scaling 300 is
    # the docs' value for ViT-B and ViT-L (width 768, 1024), and at DINOv2-S's width 384 the inverse FFT divides by
    # 384² instead of 768², so a random start changes each q and v weight by about twice its own size (std 0.045
    # against 0.015 to 0.025): the features the classifier sees at the start had a cosine of 0.07 with the
    # backbone's. From zero, the model starts as the backbone, as every other method here does.
    return {"cls": "FourierFTConfig", "kwargs": lambda m: {"n_frequency": n, "scaling": 300.0,
                                                           "target_modules": _qv(m), "random_loc_seed": 777,
                                                           "init_weights": True},
            "lr": 2e-1, "head_lr": 1e-3, "settings": settings}


def _vblora(vectors: int, settings: str) -> dict[str, Any]:
    return {"cls": "VBLoRAConfig", "kwargs": lambda m: {"r": 4, "num_vectors": vectors, "vector_length": 128,
                                                        "topk": 2, "target_modules": _qv(m),
                                                        "save_only_topk_weights": True},
            "lr": 1e-2, "param_groups": {"vector_bank": 0.1}, "settings": settings}


# Preset → PEFT config class, its kwargs for the DINOv2 classifier, the reference learning rate (the centre of the
# grid a sweep searches) and where the settings come from. "param_groups" splits the optimizer where the method's
# paper trains two kinds of its parameters at different rates (a factor of lr); "head_lr" keeps the classifier at
# the fixed rate the method's authors train it at for ViTs, while lr, searched, moves the method's own parameters.
# Every tensor gets AdamW's default weight decay (0.01), which pulls it towards zero: for the methods whose tensors
# change nothing at zero (LoRA's factors, VeRA's and FourierFT's vectors, VB-LoRA's) that is towards the backbone;
# "no_decay" exempts the method's own tensors where zero is not the no-change value ((IA)³'s scales start at 1, LN
# tuning's are the backbone's norms), as HF Trainer and timm leave norm weights undecayed.
PEFT_METHODS: dict[str, dict[str, Any]] = {
    "hf-peft": {**_lora(8), "settings": "LoRA r8 on q and v, lora_alpha 8: the plain recipe (= lora-r8)"},
    "lora-r1": _lora(1),
    "lora-r2": _lora(2),
    "lora-r4": _lora(4),
    "lora-r8": _lora(8),
    "vera": {"cls": "VeraConfig",
             "kwargs": lambda m: {"r": 256, "target_modules": _qv(m), "d_initial": 0.1, "projection_prng_key": 0,
                                  "save_projection": False},
             "lr": 4e-2, "head_lr": 4e-3,
             "settings": "VeRA r 256 (PEFT's default) on q and v, d_initial 0.1; the scaling vectors at lr and the "
                         "classifier at 4e-3 (VeRA's ViT runs train the head apart, at a lower rate than the "
                         "vectors); the shared random projections are rebuilt from projection_prng_key, not stored"},
    "fourierft": _fourierft(1000, "FourierFT on q and v, 1000 frequencies a matrix (PEFT's default), scaling 300 "
                                  "(PEFT's docs for ViT image classification), the spectrum starting at zero "
                                  "(init_weights=True: a random start at this width replaces the backbone's "
                                  "features); the spectrum at lr, the classifier at 1e-3 (the authors' ViT runs: "
                                  "0.2 to 0.3 and 8e-4 to 1e-3)"),
    "vblora": _vblora(90, "VB-LoRA r 4, top-2 of a bank of 90 vectors (the paper's base-model bank) of length 128 (its "
                          "256 does not divide DINOv2-S's 384), on q and v; the bank trains at lr/10, the logits at lr "
                          "(the paper's 1e-3 / 1e-2 split); only the top-k weights are stored"),
    "ia3": {"cls": "IA3Config",
            "kwargs": lambda m: {"target_modules": _find(m, ("key", "value", "k_proj", "v_proj", "fc2")),
                                 "feedforward_modules": _find(m, ("fc2",))},
            "lr": 3e-3, "no_decay": True,
            "settings": "(IA)³ on k, v and the MLP's second Linear (the paper's placement); lr centred on the "
                        "paper's 3e-3; no weight decay on the scales (they start at 1, their no-change value)"},
    "ln-tuning": {"cls": "LNTuningConfig",
                  "kwargs": lambda m: {"target_modules": _find(m, ("norm1", "norm2", "layernorm"), nn.LayerNorm,
                                                                inside="dinov2.")},
                  "lr": 1e-3, "no_decay": True,
                  "settings": "LN tuning: every LayerNorm's weight and bias (both norms of each block and the final "
                              "one), with no weight decay (their no-change value is the backbone's, not zero)"},
    # The same methods scaled under 20 KB a task at fp16 (the budget where heartlora's 1-bit points sit), each by its
    # own size knob: FourierFT's frequencies per matrix, VB-LoRA's bank size, (IA)³'s placement.
    "fourierft-n400": _fourierft(400, "FourierFT as the fourierft preset with 400 frequencies a matrix (19,200 "
                                      "bytes at fp16 on DINOv2-S)"),
    "vblora-v60": _vblora(60, "VB-LoRA as the vblora preset with a bank of 60 vectors (17,664 bytes at fp16)"),
    "ia3-kv": {"cls": "IA3Config",
               "kwargs": lambda m: {"target_modules": _find(m, ("key", "value", "k_proj", "v_proj")),
                                    "feedforward_modules": []},
               "lr": 3e-3, "no_decay": True,
               "settings": "(IA)³ on k and v only, the MLP left out (18,432 bytes at fp16); no weight decay on the "
                           "scales"},
    "loha": {"cls": "LoHaConfig", "kwargs": lambda m: {"r": 4, "alpha": 4, "target_modules": _qv(m)},
             "lr": 1e-3, "settings": "LoHa r 4, alpha 4, on q and v"},
    "lokr": {"cls": "LoKrConfig", "kwargs": lambda m: {"r": 4, "alpha": 4, "target_modules": _qv(m)},
             "lr": 1e-3, "settings": "LoKr r 4, alpha 4, on q and v"},
}
METHODS = ("linear-probe", *PEFT_METHODS)


def peft_spec(method: str, peft_kwargs: str | None) -> dict[str, Any]:
    """The preset of ``method``, or for ``peft:<ConfigClass>`` a spec built from ``--peft-kwargs``."""
    if method.startswith("peft:"):
        extra = json.loads(peft_kwargs or "{}")
        if not isinstance(extra, dict):
            raise SystemExit(f"--peft-kwargs must be a JSON object, got {peft_kwargs!r}")
        return {"cls": method[5:], "kwargs": lambda m: {"target_modules": _qv(m), **extra}, "lr": 1e-3,
                "settings": f"{method[5:]}({json.dumps(extra, sort_keys=True)}), target_modules q and v unless given"}
    if peft_kwargs:
        raise SystemExit("--peft-kwargs goes with --method peft:<ConfigClass>; a preset's settings are fixed")
    return PEFT_METHODS[method]


def rate_groups(named: list[tuple[str, nn.Parameter]], spec: dict[str, Any], lr: float) -> list[dict[str, Any]]:
    """AdamW groups for a preset: a parameter whose name holds a ``param_groups`` key trains at lr × its factor, the
    classifier at ``head_lr`` where the preset sets one, every other parameter at lr; with ``no_decay`` the
    method's own parameters (all but the classifier) get no weight decay (``weight_decay`` 0 in their group; the
    others keep AdamW's default)."""
    groups, head_lr = spec.get("param_groups") or {}, spec.get("head_lr")
    split: dict[tuple[float, bool], list[nn.Parameter]] = {}
    for name, p in named:
        head = "classifier" in name
        rate = head_lr if head_lr and head else lr * next((f for k, f in groups.items() if k in name), 1.0)
        split.setdefault((rate, bool(spec.get("no_decay")) and not head), []).append(p)
    return [{"params": ps, "lr": rate, **({"weight_decay": 0.0} if undecayed else {})}
            for (rate, undecayed), ps in sorted(split.items())]


def stored_bytes(state: dict[str, torch.Tensor]) -> dict[str, int]:
    """Bytes a user keeps per task: the adapter's tensors as stored, the same at fp16 (float tensors at 2 bytes, the
    others as they are), and the classifier's (fp32), from the state dict PEFT saves."""
    out = {"adapter_bytes": 0, "adapter_bytes_fp16": 0, "classifier_bytes": 0, "adapter_tensors": 0}
    for key, t in state.items():
        if "classifier" in key:
            out["classifier_bytes"] += t.numel() * 4
            continue
        out["adapter_tensors"] += 1
        out["adapter_bytes"] += t.numel() * t.element_size()
        out["adapter_bytes_fp16"] += t.numel() * (2 if t.is_floating_point() else t.element_size())
    return out


def build_model(num_classes: int) -> nn.Module:
    """``Dinov2ForImageClassification`` with the offline DINOv2 ViT-S/14 weights in its backbone."""
    from safetensors.torch import load_file
    from transformers import Dinov2ForImageClassification

    from heartlora.backbones.dinov2_offline import cached_weights, dinov2_small_config, to_installed_names

    config = dinov2_small_config(0.0)
    config.num_labels = num_classes
    model = Dinov2ForImageClassification(config)
    weights = to_installed_names(load_file(str(cached_weights())), set(model.dinov2.state_dict()))
    model.dinov2.load_state_dict(weights, strict=True)
    model.dinov2.embeddings.mask_token.requires_grad_(False)
    return model


def normalise(images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean.to(images.device)) / std.to(images.device)


@torch.no_grad()
def features(model: nn.Module, images: torch.Tensor, device: torch.device, batch: int = 128) -> torch.Tensor:
    """The classifier's input of ``Dinov2ForImageClassification``: CLS token and mean patch token, concatenated."""
    out = []
    for i in range(0, len(images), batch):
        h = model.dinov2(pixel_values=normalise(images[i:i + batch].to(device))).last_hidden_state
        out.append(torch.cat([h[:, 0], h[:, 1:].mean(1)], dim=1).cpu())
    return torch.cat(out)


CHECKPOINT = "checkpoint.pt"


def write_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """``state`` saved atomically as one file: the sha256 of the torch payload (hex, one line), then the payload."""
    buf = io.BytesIO()
    torch.save(state, buf)
    payload = buf.getvalue()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(hashlib.sha256(payload).hexdigest().encode() + b"\n" + payload)
        f.flush()
        os.fsync(f.fileno())  # on disk before the rename: a power loss leaves the old checkpoint or the new one
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_checkpoint(path: Path, settings: str) -> dict[str, Any]:
    """A checkpoint written by ``write_checkpoint`` for a run of these ``settings`` (JSON); one line and exit for an
    altered file or another run's. Loaded with ``weights_only``: tensors and plain containers, no code."""
    data = path.read_bytes()
    digest, _, payload = data.partition(b"\n")
    if hashlib.sha256(payload).hexdigest().encode() != digest:
        raise SystemExit(f"{path}: its bytes do not match the sha256 it was written with (altered or truncated); "
                         "remove it to train this run from the start")
    state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    if state.get("settings") != settings:
        raise SystemExit(f"{path}: a checkpoint of another command (it differs in "
                         f"{', '.join(differing(state.get('settings'), settings)) or 'its settings'}); run that "
                         "command, or give this one another --out")
    return state


def differing(a: str | None, b: str) -> list[str]:
    """The keys two settings fingerprints (JSON objects) disagree on; none where either is not one."""
    try:
        x, y = json.loads(a or ""), json.loads(b)
    except ValueError:
        return []
    if not (isinstance(x, dict) and isinstance(y, dict)):
        return []
    return sorted(k for k in set(x) | set(y) if x.get(k) != y.get(k))


class Trained(NamedTuple):
    """What ``train_loop`` reports."""

    seconds: float  # spent training in this process
    start: int  # the epoch it started at (0, or the epoch a checkpoint was kept after)
    earlier: float  # the wall seconds of the processes before this one
    final_train_loss: float  # the mean loss of the last epoch's batches (as heartlora's engine records it)
    nonfinite_steps: int | None  # steps whose loss was NaN or infinite, all epochs; None: a resumed checkpoint
    # written before this was counted


def train_loop(step_fn: Any, params: list[nn.Parameter] | list[dict[str, Any]], n: int,
               args: argparse.Namespace, module: nn.Module | None = None, checkpoint: Path | None = None,
               settings: str = "", started: float | None = None) -> Trained:
    """AdamW + OneCycleLR over ``args.epochs`` epochs of shuffled batches; ``step_fn(idx)`` returns the loss.
    ``params`` may be parameter groups, each with its own ``lr`` (its one-cycle peak). With ``checkpoint`` (a path)
    and ``module`` (what owns the trained parameters), the state after each epoch but the last is kept there, and a
    checkpoint found at the start (of the same ``settings``) is resumed from; it also keeps the run's wall time so far
    (the processes before this one, and this one since ``started``, a ``time.perf_counter()`` reading) and the count
    of non-finite losses. Nothing stops a run whose loss goes non-finite (the plain recipe has no such guard): the
    count says that it did."""
    steps_per_epoch = (n + args.batch_size - 1) // args.batch_size
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=WEIGHT_DECAY)
    peaks = [g["lr"] for g in opt.param_groups]
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=peaks if len(peaks) > 1 else args.lr,
                                                total_steps=args.epochs * steps_per_epoch)
    trained = {} if module is None else {k: p for k, p in module.named_parameters() if p.requires_grad}
    start, earlier, nonfinite = 0, 0.0, torch.zeros((), dtype=torch.long)
    earlier_nonfinite: int | None = 0
    started = time.perf_counter() if started is None else started
    if checkpoint is not None and checkpoint.is_file():
        state = read_checkpoint(checkpoint, settings)
        earlier = float(state.get("wall_s", 0.0))
        earlier_nonfinite = state.get("nonfinite_steps")  # absent from a checkpoint of before it was counted
        saved = state["trainable"]
        if set(saved) != set(trained) or any(saved[k].shape != trained[k].shape for k in saved):
            raise SystemExit(f"{checkpoint}: its tensors are not this model's trainable ones; remove it to train "
                             "this run from the start")
        with torch.no_grad():
            for k, p in trained.items():
                p.copy_(saved[k])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        if state["cuda_rng"]:
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        start = int(state["epoch"])
        print(f"resumed from {checkpoint} after epoch {start} of {args.epochs}", flush=True)
    t0 = time.perf_counter()
    epoch_loss = torch.zeros((), dtype=torch.float64)
    for epoch in range(start, args.epochs):
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(args.seed * 1_000_003 + epoch))
        epoch_loss = torch.zeros((), dtype=torch.float64)
        for s in range(steps_per_epoch):
            loss = step_fn(perm[s * args.batch_size:(s + 1) * args.batch_size])
            loss.backward()
            loss = loss.detach().double()  # summed where it is: no wait for the device each step
            epoch_loss, nonfinite = epoch_loss.to(loss.device) + loss, nonfinite.to(loss.device) + ~loss.isfinite()
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
        print(f"epoch {epoch + 1}/{args.epochs}: mean train loss {float(epoch_loss) / steps_per_epoch:.4g}"
              + (f", {int(nonfinite)} non-finite so far" if int(nonfinite) else ""), flush=True)
        if checkpoint is not None and epoch + 1 < args.epochs:
            write_checkpoint(checkpoint, {"settings": settings, "epoch": epoch + 1,
                                          "wall_s": earlier + time.perf_counter() - started,
                                          "nonfinite_steps": None if earlier_nonfinite is None
                                          else earlier_nonfinite + int(nonfinite),
                                          "trainable": {k: p.detach().cpu() for k, p in trained.items()},
                                          "optimizer": opt.state_dict(),
                                          # torch < 2.4 keeps OneCycleLR's anneal function (a bound method) in
                                          # its state, which weights_only refuses; the rebuilt schedule has it
                                          "scheduler": {k: v for k, v in sched.state_dict().items()
                                                        if not callable(v)},
                                          "rng": torch.get_rng_state(),
                                          "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available()
                                          else []})
    if torch.cuda.is_available():
        torch.cuda.synchronize()  # the clock reads the work done, not the work queued
    seconds = time.perf_counter() - t0
    return Trained(seconds, start, earlier, float(epoch_loss) / steps_per_epoch,
                   None if earlier_nonfinite is None else earlier_nonfinite + int(nonfinite))


def run(args: argparse.Namespace) -> dict[str, Any]:
    from heartlora.data import get_task

    t_start = time.perf_counter()
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    if device.type == "cuda":  # fp32 is exact fp32 (as on a CPU); tf32 and bf16 let matmuls use TF32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.precision != "fp32"
    task = get_task(args.task)
    train_split, eval_split = PROTOCOLS[args.protocol]
    train_x, train_y = task.load(train_split, img_size=args.img_size, seed=args.seed)
    eval_x, eval_y = task.load(eval_split, img_size=args.img_size, seed=args.seed)
    steps_per_epoch = (len(train_x) + args.batch_size - 1) // args.batch_size
    if re.search(r"@\d+shot$", args.task) and args.epochs * steps_per_epoch < MIN_FEWSHOT_STEPS:
        # the same floor heartlora's engine applies to K-shot tasks, so both train for as many steps
        args.epochs = -(-MIN_FEWSHOT_STEPS // steps_per_epoch)
    model = build_model(task.num_classes).to(device)
    settings = {k: v for k, v in vars(args).items()
                if k not in ("out", "device", "threads", "save_peft")
                and not (k in ("peft_kwargs", "rank", "alpha") and v is None)}
    # what a checkpoint must match to be resumed: the command's settings, the device, the versions, and for a PEFT
    # method its config and optimizer groups as the code defines them now (a preset edited since is another run)
    fingerprint = {**settings, "device": device.type, "torch": torch.__version__}
    resume = {"checkpoint": args.out / CHECKPOINT, "settings": json.dumps(fingerprint, sort_keys=True),
              "started": t_start}
    sizes: dict[str, int] = {}
    peft_info: dict[str, Any] = {}
    if args.method == "linear-probe":
        model.eval()
        f_train, f_eval = features(model, train_x, device), features(model, eval_x, device)
        clf = nn.Linear(f_train.shape[1], task.num_classes).to(device)
        params = list(clf.parameters())
        sizes = {"adapter_bytes": 0, "adapter_bytes_fp16": 0, "adapter_tensors": 0,
                 "classifier_bytes": sum(p.numel() * 4 for p in params)}
        trained = train_loop(lambda idx: F.cross_entropy(clf(f_train[idx].to(device)), train_y[idx].to(device)),
                             params, len(train_x), args, module=clf, **resume)
        with torch.no_grad():
            pred = torch.cat([clf(f_eval[i:i + 512].to(device)).argmax(1).cpu() for i in range(0, len(f_eval), 512)])
    else:
        import peft
        from peft import get_peft_model, get_peft_model_state_dict

        spec = peft_spec(args.method, args.peft_kwargs)
        config_cls = getattr(peft, spec["cls"], None)
        if config_cls is None or not spec["cls"].endswith("Config"):
            raise SystemExit(f"--method peft:{spec['cls']}: peft {peft.__version__} has no config class of that name")
        peft_kwargs = spec["kwargs"](model)
        for flag, key in (("rank", "r"), ("alpha", "lora_alpha")):
            if getattr(args, flag, None) is not None:
                if spec["cls"] != "LoraConfig" or args.method.startswith("peft:"):
                    raise SystemExit(f"--{flag} goes with the LoRA presets (hf-peft, lora-rN) only")
                peft_kwargs[key] = getattr(args, flag)
        config = config_cls(**peft_kwargs, modules_to_save=["classifier"])
        model = get_peft_model(model, config)
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        params: list[Any] = rate_groups(trainable, spec, args.lr)  # one group at lr unless the preset splits it
        peaks = [g["lr"] for g in params]  # before the schedule changes them
        decays = [g.get("weight_decay") for g in params]  # None: AdamW's default
        resume["settings"] = json.dumps({**fingerprint, "peft": peft.__version__, "config": spec["cls"],
                                         "peft_kwargs": peft_kwargs, "peaks": peaks,
                                         **({"decays": decays} if any(d is not None for d in decays) else {})},
                                        sort_keys=True, default=str)
        model.train()

        def step(idx: torch.Tensor) -> torch.Tensor:
            x = normalise(train_x[idx].to(device))
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
                logits = model(pixel_values=x).logits
            return F.cross_entropy(logits.float(), train_y[idx].to(device))

        trained = train_loop(step, params, len(train_x), args, module=model, **resume)
        if args.save_peft:  # the trained adapter as a PEFT folder (what `heartlora prune` reads)
            model.peft_config["default"].base_model_name_or_path = "dinov2_small"
            model.save_pretrained(str(args.save_peft))
        model.eval()
        sizes = stored_bytes(get_peft_model_state_dict(model))
        peft_info = {"peft_config": spec["cls"], "peft_settings": spec["settings"],
                     "peft_kwargs": {k: v for k, v in peft_kwargs.items() if k != "target_modules"},
                     "target_modules": len(peft_kwargs.get("target_modules", [])),
                     "peft_version": peft.__version__,
                     "peak_lrs": peaks,
                     "weight_decays": [WEIGHT_DECAY if d is None else d for d in decays]}
        with torch.no_grad():
            pred = torch.cat([model(pixel_values=normalise(eval_x[i:i + 128].to(device))).logits.argmax(1).cpu()
                              for i in range(0, len(eval_x), 128)])
    acc = float((pred == eval_y).float().mean())
    return {
        "task": args.task, "method": args.method, "backbone": "dinov2_small", "protocol": args.protocol,
        "seed": args.seed, "settings": settings, "accuracy": acc, "accuracy_split": eval_split,
        "train_split": train_split, "selection": "none: the last epoch is reported; evaluated once, after training",
        **sizes, **peft_info,
        "trainable_params": sum(p.numel() for g in params for p in (g["params"] if isinstance(g, dict) else [g])),
        "heads_total": 0, "heads_off": [],
        "final_train_loss": trained.final_train_loss, "nonfinite_loss_steps": trained.nonfinite_steps,
        "wall_s": trained.earlier + time.perf_counter() - t_start,  # a resumed run's earlier processes included
        "train_images_per_s": (args.epochs - trained.start) * len(train_x) / max(trained.seconds, 1e-9),
        **({"resumed_after_epoch": trained.start} if trained.start else {}),
        "engine": "outside heartlora: transformers + PEFT + torch (benchmarks/baselines/hf_peft.py)",
        "machine": {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "device": str(device)},
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", required=True, help="any task heartlora reads: a name, vtab:DIR, NAME@Kshot")
    ap.add_argument("--method", default="hf-peft",
                    help=f"one of {', '.join(METHODS)}, or peft:<ConfigClass> (any config PEFT ships) with "
                         "--peft-kwargs")
    ap.add_argument("--peft-kwargs", default=None, help="JSON: the config's arguments for --method peft:<ConfigClass>")
    ap.add_argument("--protocol", default="final", choices=tuple(PROTOCOLS))
    ap.add_argument("--img-size", type=int, default=112)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=None,
                    help="peak learning rate (default: the method's reference rate; 1e-3 for hf-peft and linear-probe)")
    ap.add_argument("--rank", type=int, default=None, help="LoRA presets: another rank (r)")
    ap.add_argument("--alpha", type=float, default=None, help="LoRA presets: another lora_alpha")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--precision", default="fp32", choices=("fp32", "tf32", "bf16"),
                    help="fp32 (exact, as on a CPU), tf32 (TF32 matmuls on CUDA) or bf16 (autocast; TF32 too)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--out", type=Path, required=True,
                    help="run folder; a folder with metrics.json is not run again, one with a checkpoint.pt of this "
                         "command resumes")
    ap.add_argument("--save-peft", type=Path, default=None, help="hf-peft: also save the trained adapter (PEFT folder)")
    args = ap.parse_args(argv)
    if args.method not in METHODS and not args.method.startswith("peft:"):
        ap.error(f"--method {args.method}: not one of {', '.join(METHODS)} nor peft:<ConfigClass>")
    if args.lr is None:
        args.lr = LINEAR_PROBE_LR if args.method == "linear-probe" else peft_spec(args.method, args.peft_kwargs)["lr"]
    if not (args.lr > 0 and args.lr < float("inf")):
        ap.error(f"--lr {args.lr}: must be a positive finite number")
    done = args.out / "metrics.json"
    if done.is_file():
        return json.loads(done.read_text())
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    for stray in args.out.glob(".*.tmp"):  # a write a killed run left half done (the files themselves are intact)
        stray.unlink(missing_ok=True)
    metrics = run(args)
    tmp = done.with_name(f".metrics.json.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(metrics, indent=1))
    os.replace(tmp, done)
    (args.out / CHECKPOINT).unlink(missing_ok=True)  # metrics.json now says the run is done
    print(f"{args.method} on {args.task}: {metrics['accuracy_split']} accuracy {100 * metrics['accuracy']:.2f} % "
          f"({metrics['wall_s']:.0f} s)")
    return metrics


if __name__ == "__main__":
    main()
