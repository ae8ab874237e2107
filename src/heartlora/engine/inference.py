"""The trained-model file of a run (``adapter.safetensors``) and using it: load, classify images, read metadata.

Adapter methods (lora, bi-lora, heart-*) store the core's adapter file (``heartlora.method.save_adapter``) with the
run's facts in its extra metadata. ``linear`` and ``full`` have no adapter, so the engine stores their trainable
tensors itself in a safetensors file of the same name (format ``heartlora-weights-2``), protected like adapter
files: a sha256 over every tensor (name, dtype, shape, bytes) and the run's facts, checked on load, so any change
to the weights or to the metadata that sets the output or the labels reads as a corrupt file. ``load_trained``
reads both kinds.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import UnidentifiedImageError
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from heartlora._paths import atomic_path
from heartlora.backbones import create_backbone, refuse_download
from heartlora.data.base import ImageTooLargeError, open_image, resize_image
from heartlora.engine.settings import RANGES
from heartlora.engine.metrics import predict_logits
from heartlora.errors import AdapterFileError, ConfigError, ImageReadError, TaskError
from heartlora.method import read_adapter_info
from heartlora.method.model import backbone_fingerprint
from heartlora.method.storage import RUN_KEY, adapter_file, check_backbone_spec

WEIGHTS_FORMAT = "heartlora-weights-2"  # -1 files had no checksum
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def save_weights(model: nn.Module, path: str | Path, names: Iterable[str], run: dict[str, Any]) -> int:
    """Store the named tensors of ``model`` (linear/full runs) with the run's facts; returns the payload bytes."""
    state = model.state_dict()
    tensors = {n: state[n].detach().cpu().contiguous() for n in names}
    run_json = json.dumps(run)
    meta = {"format": WEIGHTS_FORMAT, RUN_KEY: run_json, "sha256": weights_digest(tensors, run_json)}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return sum(t.numel() * t.element_size() for t in tensors.values())


def weights_digest(tensors: dict[str, torch.Tensor], run_json: str) -> str:
    """sha256 over the format, the run's facts as stored, and every tensor's name, dtype, shape and bytes."""
    h = hashlib.sha256(f"{WEIGHTS_FORMAT}\n{run_json}\n".encode())
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{list(t.shape)}\n".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _file_metadata(path: Path) -> dict[str, str]:
    if not path.is_file():
        raise AdapterFileError(f"adapter file {path} does not exist: give the adapter.safetensors of a finished run")
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as exc:  # safetensors raises its own error types for every kind of damage
        raise AdapterFileError(f"{path} is not a readable safetensors file ({str(exc)[:100]}): "
                               "re-run training or copy the file again") from exc


def read_run_info(path: str | Path) -> dict[str, Any]:
    """What a run's model file says about itself: ``run`` (the facts the engine stored: backbone spec, task, class
    names, method, …), ``adapter`` (the core's metadata, None for linear/full) and ``kind`` ("adapter" or
    "weights"). A run folder stands for its adapter.safetensors."""
    path = adapter_file(path)
    meta = _file_metadata(path)
    if meta.get("format") == "heartlora-weights-1":
        raise AdapterFileError(f"{path} was written by an older heartlora without a checksum, so its integrity "
                               "cannot be checked: train the run again")
    if meta.get("format") == WEIGHTS_FORMAT:
        try:
            run = json.loads(meta[RUN_KEY])
        except (KeyError, ValueError) as exc:
            raise AdapterFileError(f"{path} has damaged metadata: re-run training") from exc
        if not isinstance(run, dict) or not isinstance(run.get("backbone_spec"), dict):
            raise AdapterFileError(f"{path} is corrupt: its run facts name no backbone; re-run training")
        return {"kind": "weights", "run": _checked_run(run, path), "adapter": None, "meta": meta,
                "tensors": _checked_weights(path, meta)}

    info = read_adapter_info(path)
    # A file from the API's save_adapter has no run facts: an empty run (eval then needs --task).
    run = (info.get("extra") or {}).get(RUN_KEY, {})
    return {"kind": "adapter", "run": _checked_run(run, path), "adapter": info}


def run_img_size(info: dict[str, Any]) -> int | None:
    """The image size a run's model file (its :func:`read_run_info`) was trained at, where it says: the run's own
    setting, else its backbone spec's."""
    run = info["run"]
    spec = run.get("backbone_spec") or (info.get("adapter") or {}).get("backbone") or {}
    return run.get("img_size") or spec.get("img_size")


def _checked_weights(path: Path, meta: dict[str, str]) -> dict[str, torch.Tensor]:
    """The tensors of a weights file, once its checksum matches them and its run facts (every reader checks it:
    inspect as eval and predict)."""
    try:
        tensors = load_file(str(path))
    except Exception as exc:
        raise AdapterFileError(f"{path} is damaged ({str(exc)[:100]}): re-run training") from exc
    if weights_digest(tensors, meta[RUN_KEY]) != meta.get("sha256"):
        raise AdapterFileError(f"{path} is corrupt (its checksum does not match its weights and metadata): "
                               "copy the file again or re-run training")
    return tensors


def _checked_run(run: Any, path: Path) -> dict[str, Any]:
    """The run facts, if every field that is used has a sane type and range (before anything is built)."""
    if not isinstance(run, dict):
        raise AdapterFileError(f"{path} is corrupt: its run facts are not a JSON object; re-run training")
    names, seed, size = run.get("class_names", []), run.get("init_seed", 0), run.get("img_size")
    ok = (isinstance(run.get("task", ""), str) and isinstance(run.get("method", ""), str)
          and isinstance(names, list) and all(isinstance(c, str) for c in names)
          and isinstance(run.get("pretrained", True), bool) and _valid("seed", seed)
          and (size is None or _valid("img_size", size)))
    if not ok:
        raise AdapterFileError(f"{path} is corrupt: a field of its run facts has the wrong type or range; "
                               "re-run training")
    if "backbone_spec" in run:
        spec = check_backbone_spec(run["backbone_spec"], path)
        if run.get("class_names") and len(run["class_names"]) != spec.get("num_classes"):
            raise AdapterFileError(f"{path} is corrupt: it names {len(run['class_names'])} classes for a "
                                   f"{spec.get('num_classes')}-way classifier; re-run training")
    return run


def _valid(name: str, value: Any) -> bool:
    """Whether a stored setting is one ``heartlora train`` accepts (the same ``RANGES`` its flags are checked with)."""
    try:
        RANGES[name].check(name, value)
    except ConfigError:
        return False
    return True


def build_backbone(run: dict[str, Any], pretrained: bool | None = None, override: str | None = None,
                   source: str = "this file") -> nn.Module:
    """The backbone a run was trained on, built again from its spec (same seed, so random inits match too). A
    backbone the spec names is never downloaded (`refuse_download`); ``override`` (the user's choice) is built
    instead of the spec's name, with the spec's other settings. The caller's random state is left as it was: the
    seed applies inside a fork of the CPU generator (the backbone is built on the CPU)."""
    spec = dict(run["backbone_spec"])
    pretrained = run.get("pretrained", True) if pretrained is None else pretrained
    if override:
        spec["name"] = override
    else:
        refuse_download(spec["name"], pretrained, source)
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(int(run.get("init_seed", 0)))
        return create_backbone(**spec, pretrained=pretrained)


def load_trained(path: str | Path, device: torch.device | str = "cpu",
                 backbone: str | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """The trained classifier stored at ``path`` (a run folder or its adapter.safetensors), in eval mode on
    ``device``, and its ``read_run_info``; ``backbone`` builds that backbone instead of the one the file names (the
    fingerprint check still applies). The model takes float images in [0, 1], (N, 3, S, S) at the training size
    ``info["run"]["img_size"]``, and returns logits over ``info["run"]["class_names"]``."""
    path = adapter_file(path)
    info = read_run_info(path)
    run = info["run"]
    if info["kind"] == "adapter":
        from heartlora.method import load_adapter

        if "backbone_spec" not in run:  # saved by the API: the adapter's own spec describes the backbone
            run = {**run, "backbone_spec": info["adapter"]["backbone"]}
        if "num_classes" not in run["backbone_spec"]:
            raise AdapterFileError(f"{path} was saved from a {run['backbone_spec']['name']} that create_backbone did "
                                   "not build, so it cannot be rebuilt here: load it in Python with "
                                   "heartlora.load_adapter(your_backbone, path)")
        model = load_adapter(build_backbone(run, override=backbone, source=str(path)), path)
    else:
        full = run.get("method") == "full"
        model = build_backbone(run, pretrained=False if full else None, override=backbone, source=str(path))
        tensors = info["tensors"]
        state = model.state_dict()
        bad = [n for n, t in tensors.items() if n not in state or state[n].shape != t.shape]
        built = backbone or run["backbone_spec"].get("name")  # the one built: the user's --backbone where given
        if bad:
            raise AdapterFileError(f"{path} does not fit backbone {built} (e.g. {bad[0]})")
        model.load_state_dict(tensors, strict=False)
        if not full:
            for p in model.parameters():
                p.requires_grad_(False)
            for n, p in model.named_parameters():
                if n in tensors:
                    p.requires_grad_(True)
            want = run.get("fingerprint")
            if want and backbone_fingerprint(model, skip=("head",)) != want:
                raise AdapterFileError(f"{path} was trained on other backbone weights than {built} gives here: use "
                                       "the same backbone weights (and --no-pretrained setting)")
    return model.to(device).eval(), info


def read_image(path: str | Path, img_size: int) -> torch.Tensor:
    """One image file as uint8 (3, S, S), decoded and resized by the code that made the training data
    (``data.base.resize_image``: PIL bicubic, 16-bit and float images scaled, not clipped)."""
    path = Path(path)
    try:
        with open_image(path) as im:  # refuses decompression bombs before decoding
            array = resize_image(im, img_size)
    except FileNotFoundError as exc:
        raise ImageReadError(f"image {path} does not exist: check the path") from exc
    except ImageTooLargeError:
        raise
    except TaskError as exc:  # a mode the data part refuses (LAB, NaN floats)
        raise ImageReadError(f"image {path}: {exc}") from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise ImageReadError(f"cannot read image {path} ({type(exc).__name__}): give a PNG, JPEG or other image "
                             "file PIL can open") from exc
    return torch.from_numpy(np.ascontiguousarray(array))


def collect_images(inputs: Iterable[str | Path]) -> list[Path]:
    """Image files from files and folders (a folder gives its image files, sorted, not recursing)."""
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                subfolders = sorted(f.name for f in p.iterdir() if f.is_dir())
                hint = (f"; its subfolders ({', '.join(subfolders[:3])}{', …' if len(subfolders) > 3 else ''}) are "
                        "not searched: name them" if subfolders else "")
                raise ImageReadError(f"folder {p} holds no image files ({', '.join(IMAGE_SUFFIXES[:4])}, …){hint}")
            files.extend(found)
        elif p.exists():
            files.append(p)
        else:
            raise ImageReadError(f"image {p} does not exist: check the path")
    return files


@torch.no_grad()
def classify(model: nn.Module, files: list[Path], img_size: int, class_names: list[str], top_k: int = 5,
             device: torch.device | str = "cpu", batch_size: int = 64) -> list[dict[str, Any]]:
    """Top-k (label, probability) per image file."""
    results = []
    for start in range(0, len(files), batch_size):
        chunk = files[start:start + batch_size]
        images = torch.stack([read_image(f, img_size) for f in chunk])
        probs = predict_logits(model, images, torch.device(device), batch_size).softmax(1)
        k = min(top_k, probs.shape[1])
        values, idx = probs.topk(k, dim=1)
        for f, v, i in zip(chunk, values.tolist(), idx.tolist()):
            names = [class_names[j] if j < len(class_names) else str(j) for j in i]
            results.append({"image": str(f), "top": [{"label": n, "index": j, "prob": p}
                                                     for n, j, p in zip(names, i, v)]})
    return results
