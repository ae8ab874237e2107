"""Mutated adapter files (seeded): every load gives exactly the original logits or raises a HeartLoRAError subclass.

The file is a real run file: a tiny random timm ViT (``test_vit``, 6 layers × 2 heads) built by ``create_backbone``,
adapters on q, v and o with heads switched off, saved with run facts as ``heartlora train`` saves them, loaded the
way ``eval`` and ``predict`` load it (``load_trained``: the backbone is rebuilt from the file's own spec).

Two kinds of damage:
- *raw*: byte flips (header, metadata JSON, digits in it, tensor data), truncations, appended bytes, JSON edits
  that keep the old checksum. These must give the original logits bit for bit, or an error.
- *re-signed*: JSON edits, shape and dtype edits, dropped or added tensors, written with fresh checksums (as a
  careless tool, or a bug, would write them), in format 2 and as format-1 files without a metadata checksum. The
  output may differ (the file says other things), but every load ends in a clean load or a HeartLoRAError, never
  another exception, and never allocates for an absurd value (the loop runs under an address-space limit).
"""

from __future__ import annotations

import copy
import json
import os
import random
import resource
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

import heartlora.method as hl
from heartlora.errors import AdapterFileError, HeartLoRAError
from heartlora.method import storage

RAW_CASES = 130  # per bit width
RESIGNED_CASES = 70  # per bit width and format version
VALUES: list[Any] = [0, 1, -1, 2, 3, 7, 31, 33, 10**9, 1e9, -32, 10**5, 10**6, 1.5, 0.5, -0.5, float("nan"),
                     float("inf"), 2**63, "", "x", "q", "q,v", [], [1], ["q"], [[1, 2]], {}, {"a": 1}, None, True,
                     False, [True, False], [4, 32], [-4, 32], [10**9, 10**9]]


def split(data: bytes) -> tuple[dict[str, Any], bytes]:
    """A safetensors file's header (JSON) and tensor bytes."""
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def resign(tensors: dict[str, torch.Tensor], meta: Any, version: int = storage.FORMAT_VERSION) -> bytes:
    """A file holding ``tensors`` and ``meta`` with checksums that match them (format 1: no metadata checksum)."""
    if isinstance(meta, dict):
        meta = {**meta, "payload_sha256": storage._payload_hash(tensors)}
        if "format_version" in meta:
            meta["format_version"] = version
    text = json.dumps(meta)
    header = {storage._META_KEY: text}
    if version >= 2:
        header[storage._META_SHA_KEY] = storage._text_hash(text)
    return st_save(tensors, metadata=header)


def parts(data: bytes) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    header, _ = split(data)
    return dict(st_load(data)), json.loads(header["__metadata__"][storage._META_KEY])


def write_run_file(path: Path, bits: int, dtype: str | None = None) -> torch.Tensor:
    """Save a trained-looking run file at ``path``; return the input used to compare logits."""
    from heartlora.backbones import create_backbone
    from heartlora.engine.inference import RUN_KEY

    torch.manual_seed(7)
    model = create_backbone("test_vit", num_classes=3, img_size=32, pretrained=False)
    run = {"backbone_spec": model.spec, "pretrained": False, "init_seed": 7, "task": "tiny", "method": "heart-lora",
           "class_names": ["a", "b", "c"], "img_size": 32, "protocol": "val"}
    hl.attach(model, hl.HeartLoRAConfig(targets=("q", "v", "o"), rank=4, bits=bits))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in list(hl.adapter_parameters(model)) + list(model.head.parameters()):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    layers = hl.attention_layers(model)
    hl.deactivate_heads(model, heads=[(layers[0].name, 1), (layers[3].name, 0), (layers[3].name, 1)])
    hl.save_adapter(model, path, extra_metadata={RUN_KEY: run}, dtype=dtype)
    return torch.rand(2, 3, 32, 32, generator=g)


def load_logits(path: Path, x: torch.Tensor) -> torch.Tensor:
    from heartlora.engine.inference import load_trained

    hl.read_adapter_info(path)  # what inspect reads must pass or fail like the full load
    model, _ = load_trained(path)
    with torch.no_grad():
        return model(x)


@contextmanager
def memory_cap(extra_bytes: int = 3 << 30) -> Iterator[None]:
    """Cap this process's address space at its current size plus ``extra_bytes``: a file that makes the loader
    allocate gigabytes fails with an exception the test sees, instead of exhausting the machine."""
    with open("/proc/self/statm") as f:
        used = int(f.read().split()[0]) * resource.getpagesize()
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (used + extra_bytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


# ---------------------------------------------------------------------------------------------------------------------
# Raw damage: bytes as a disk, a copy or an editor would change them


def flip(data: bytes, lo: int, hi: int, rng: random.Random) -> bytes:
    i = rng.randrange(lo, hi)
    out = bytearray(data)
    out[i] ^= rng.choice([1 << rng.randrange(8), rng.randrange(1, 256)])
    return bytes(out)


def retype_digit(data: bytes, rng: random.Random) -> bytes:
    """One digit of the header changed to another digit (``"scale": 1.0`` → ``9.0``, a rank, a class count…)."""
    n = struct.unpack("<Q", data[:8])[0]
    positions = [i for i in range(8, 8 + n) if 48 <= data[i] <= 57]
    i = rng.choice(positions)
    out = bytearray(data)
    out[i] = rng.choice([d for d in range(48, 58) if d != data[i]])
    return bytes(out)


def edit_keeping_checksum(data: bytes, rng: random.Random) -> bytes:
    """A JSON edit with the metadata checksum of the original left in place."""
    header, payload = split(data)
    meta = json.loads(header["__metadata__"][storage._META_KEY])
    mutate_json(meta, rng)
    header["__metadata__"][storage._META_KEY] = json.dumps(meta)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + payload


def raw_mutation(data: bytes, rng: random.Random) -> tuple[str, bytes]:
    n = struct.unpack("<Q", data[:8])[0]
    kind = rng.choice(["header", "digit", "data", "truncate", "append", "json"])
    if kind == "header":
        return kind, flip(data, 0, 8 + n, rng)
    if kind == "digit":
        return kind, retype_digit(data, rng)
    if kind == "data":
        return kind, flip(data, 8 + n, len(data), rng)
    if kind == "truncate":
        return kind, data[:rng.randrange(len(data))]
    if kind == "append":
        return kind, data + bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))
    return kind, edit_keeping_checksum(data, rng)


# ---------------------------------------------------------------------------------------------------------------------
# Re-signed damage: self-consistent checksums over wrong content


def _paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, prefix + (i,))
    return out


def mutate_json(meta: dict[str, Any], rng: random.Random) -> str:
    """Change one value anywhere in ``meta`` (replace, delete, append, or nudge a number); return what was done."""
    path = rng.choice([p for p in _paths(meta) if p])
    parent = meta
    for key in path[:-1]:
        parent = parent[key]
    key, old = path[-1], parent[path[-1]]
    op = rng.choice(["replace", "replace", "delete", "append", "nudge"])
    if op == "delete":
        del parent[key]
    elif op == "append" and isinstance(old, (list, dict)):
        if isinstance(old, list):
            old.append(copy.deepcopy(rng.choice(old)) if old else rng.choice(VALUES))
        else:
            old["new_field"] = rng.choice(VALUES)
    elif op == "nudge" and isinstance(old, (int, float)) and not isinstance(old, bool):
        parent[key] = old + rng.choice([-1, 1, 0.5, 100])
    else:
        parent[key] = copy.deepcopy(rng.choice(VALUES))
    return f"{op} {'/'.join(map(str, path))}"


def mutate_tensors(tensors: dict[str, torch.Tensor], rng: random.Random) -> str:
    key = rng.choice(sorted(tensors))
    t = tensors[key]
    op = rng.choice(["reshape", "resize", "dtype", "drop", "add", "nan"])
    if op == "reshape" and t.ndim == 2:
        tensors[key] = t.reshape(t.shape[1], t.shape[0]) if t.shape[0] != t.shape[1] else t.reshape(-1)
    elif op == "resize":
        shape = [max(0, s + rng.choice([-1, 1, 7])) for s in t.shape]
        tensors[key] = torch.zeros(shape, dtype=t.dtype)
    elif op == "dtype":
        tensors[key] = t.to(rng.choice([torch.float16, torch.float64, torch.int32, torch.uint8, torch.float32]))
    elif op == "drop":
        del tensors[key]
    elif op == "add":
        tensors[key + rng.choice([".extra", "x"])] = torch.zeros(3)
    else:
        tensors[key] = t.float().clone().fill_(float("nan")) if t.is_floating_point() else t
    return f"{op} {key}"


def resigned_mutation(data: bytes, rng: random.Random, version: int) -> tuple[str, bytes]:
    tensors, meta = parts(data)
    what = mutate_tensors(tensors, rng) if rng.random() < 0.3 else mutate_json(meta, rng)
    return what, resign(tensors, meta, version)


# ---------------------------------------------------------------------------------------------------------------------


def fuzz(folder: Path, bits: int, version: int | None, dtype: str | None = None) -> list[tuple[str, str]]:
    """Run the seeded cases on a fresh run file in ``folder`` (its values stored as ``dtype``): raw damage when
    ``version`` is None, else re-signed damage in that format. Returns (what was done, outcome) with outcome
    "identical", "other output" or "refused"; any exception other than a one-line HeartLoRAError propagates, naming
    the case."""
    good = folder / "adapter.safetensors"
    x = write_run_file(good, bits, dtype)
    data = good.read_bytes()
    reference = load_logits(good, x)
    if version is not None:
        tensors, meta = parts(data)
        (folder / "clean.safetensors").write_bytes(resign(tensors, meta, version))
        assert torch.equal(load_logits(folder / "clean.safetensors", x), reference)  # re-signing changes nothing
    rng = random.Random(1000 + bits if version is None else 2000 + 10 * bits + version)
    bad = folder / "mutated.safetensors"
    results = []
    with memory_cap():
        for case in range(RAW_CASES if version is None else RESIGNED_CASES):
            what, mutated = raw_mutation(data, rng) if version is None else resigned_mutation(data, rng, version)
            bad.write_bytes(mutated)
            try:
                logits = load_logits(bad, x)
                results.append((what, "identical" if torch.equal(logits, reference) else "other output"))
            except HeartLoRAError as e:
                assert str(e) and "\n" not in str(e), f"case {case} ({what}): {e!r}"
                results.append((what, "refused"))
            except Exception as e:  # the point of the fuzz: name the case that escaped
                raise AssertionError(f"case {case} ({what}) raised {type(e).__name__}: {e}") from e
    return results


@pytest.mark.parametrize(("bits", "dtype"), [(32, None), (1, None), (32, "float16"), (1, "bfloat16")])
def test_raw_damage_gives_the_original_logits_or_an_error(bits: int, dtype: str | None, tmp_path: Path) -> None:
    results = fuzz(tmp_path, bits, None, dtype)
    assert not [r for r in results if r[1] == "other output"], results
    # Every kind of damage was tried, and damage that changes content was refused (a flip in the padding of the
    # header or trailing bytes may be harmless; a changed digit, tensor byte or JSON edit never is).
    assert {what for what, _ in results} == {"header", "digit", "data", "truncate", "append", "json"}
    assert all(outcome == "refused" for what, outcome in results if what in ("digit", "data", "json", "truncate"))


@pytest.mark.parametrize("version", [2, 1])
@pytest.mark.parametrize("bits", [32, 1])
def test_resigned_damage_loads_or_raises_a_heartlora_error(bits: int, version: int, tmp_path: Path,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    results = fuzz(tmp_path, bits, version)
    # Most edits make the file inconsistent; the rest set a legal value (another scale, a NaN classifier weight,
    # a field no output depends on), which a file with matching checksums is entitled to.
    assert sum(outcome == "refused" for _, outcome in results) >= len(results) // 2
    assert ("format-1" in caplog.text) == (version == 1)


@pytest.mark.parametrize("bits", [32, 1])
def test_resigned_damage_to_a_half_precision_file_loads_or_raises_a_heartlora_error(bits: int, tmp_path: Path) -> None:
    """Format 3 (values stored as float16): the same re-signed damage, tensors given another dtype among them."""
    results = fuzz(tmp_path, bits, 3, "float16")
    assert sum(outcome == "refused" for _, outcome in results) >= len(results) // 2


def test_a_changed_setting_with_the_old_checksum_is_corrupt(tmp_path: Path) -> None:
    """Item 1 of issue 10: a stored scale edited (``"scale": 4.0`` → ``9.0``) used to load silently and change every
    prediction."""
    good = tmp_path / "adapter.safetensors"
    write_run_file(good, 32)
    header, payload = split(good.read_bytes())
    for old, new in [('"scale": 4.0', '"scale": 9.0'), ('["a", "b", "c"]', '["c", "b", "a"]')]:
        text = header["__metadata__"][storage._META_KEY]
        assert old in text
        edited = {**header, "__metadata__": {**header["__metadata__"], storage._META_KEY: text.replace(old, new)}}
        raw = json.dumps(edited).encode()
        raw += b" " * (-len(raw) % 8)
        good.with_name("edited.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + payload)
        with pytest.raises(AdapterFileError, match="metadata does not match the checksum"):
            hl.read_adapter_info(good.with_name("edited.safetensors"))


# ---------------------------------------------------------------------------------------------------------------------
# Run folders (issue 36): checkpoint.pt and metrics.json damaged, swapped between runs, or replaced by links. Every
# `heartlora train --out X --resume` must refuse in one line, naming the file, with the folder left as it was, or
# give exactly the undamaged folder's result. A traceback, another exit status, or another result fails the test.

# Sampled with fixed seeds; HEARTLORA_FUZZ_SCALE=N tries N times as many (the deeper run docs/RELIABILITY.md quotes).
SCALE = max(1, int(os.environ.get("HEARTLORA_FUZZ_SCALE", "1")))
RUN_CASES = 20 * SCALE  # per file (checkpoint.pt, metrics.json)


def report(what: str, results: list[tuple[str, str]]) -> None:
    """The outcome counts docs/RELIABILITY.md quotes (shown with pytest -s)."""
    from collections import Counter

    by_kind: dict[str, Counter] = {}
    for kind, outcome in results:
        by_kind.setdefault(kind, Counter())[outcome] += 1
    total = Counter(outcome for _, outcome in results)
    print(f"\nFUZZ {what}: {len(results)} cases, {dict(total)}; by kind: "
          + ", ".join(f"{k} {dict(v)}" for k, v in sorted(by_kind.items())))


def _run_flags(task: str, seed: int, epochs: int) -> list[str]:
    return ["train", "--task", task, "--method", "heart-lora", "--ne", "3", "--epochs", str(epochs), "--seed",
            str(seed), "--backbone", "test_vit", "--no-pretrained", "--img-size", "32", "--batch-size", "32",
            "--quiet"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Four real run folders: stopped after epoch 1 of 2 (seeds 42 and 7) and finished (seeds 42 and 7)."""
    from tiny_task import write_tiny_vtab

    from heartlora.cli.main import main

    root = tmp_path_factory.mktemp("fuzz_runs")
    task = write_tiny_vtab(root / "task")
    torch.set_num_threads(1)
    folders = {}
    for name, seed, epochs, stop in (("stopped", 42, 2, True), ("stopped7", 7, 2, True), ("finished", 42, 1, False),
                                     ("finished7", 7, 1, False)):
        folders[name] = root / name
        argv = _run_flags(task, seed, epochs) + ["--out", str(folders[name])] + (["--stop-after-epoch", "1"] * stop)
        assert main(argv) == 0
    return folders


def _snapshot(folder: Path) -> dict[str, Any]:
    """Every entry of a folder: file bytes, a link's target, or "folder"."""
    out: dict[str, Any] = {}
    for p in sorted(folder.iterdir()):
        out[p.name] = (f"-> {os.readlink(p)}" if p.is_symlink() else "folder" if p.is_dir() else p.read_bytes())
    return out


def _resume(folder: Path, capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    from heartlora.cli.main import main

    capsys.readouterr()
    code = main(["train", "--out", str(folder), "--resume", "--quiet", "--json"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _losses(metrics: dict[str, Any]) -> list[tuple]:
    """The result-bearing part of a run's history (its timings differ from run to run)."""
    return [(h.get("train_loss"), h.get("train_acc"), h.get("eval_acc")) for h in metrics["history"]]


def damage_file(folder: Path, name: str, kind: str, rng: random.Random, other: Path) -> None:
    """Damage ``folder/name`` as ``kind`` says; ``other`` is the same file of another run."""
    target = folder / name
    data = target.read_bytes()
    if kind == "flip":
        target.write_bytes(flip(data, 0, len(data), rng))
    elif kind == "truncate":
        target.write_bytes(data[:rng.randrange(len(data))])
    elif kind == "append":
        target.write_bytes(data + bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64))))
    elif kind == "swap":
        target.write_bytes(other.read_bytes())
    elif kind == "link":
        target.unlink()
        target.symlink_to(other)
    elif kind == "folder":
        target.unlink()
        target.mkdir()
    elif kind == "empty":
        target.write_bytes(b"")
    elif kind == "edit":  # metrics.json: a reported number changed, the old checksum kept
        doc = json.loads(data)
        doc[rng.choice(["accuracy", "wall_s", "heads_total", "seed"])] = rng.choice([0.99, 0, 7, 1e9])
        target.write_text(json.dumps(doc, indent=2))
    elif kind == "resigned":  # metrics.json: the accuracy changed and the checksum recomputed
        from heartlora.engine.metrics import metrics_digest

        doc = json.loads(data)
        doc["accuracy"] = 0.99
        doc["sha256"] = metrics_digest(doc)
        target.write_text(json.dumps(doc, indent=2))
    elif kind == "list":
        target.write_text("[]")
    else:
        raise AssertionError(kind)


RUN_DAMAGE = {"checkpoint.pt": ["flip", "flip", "truncate", "append", "swap", "link", "folder", "empty"],
              "metrics.json": ["flip", "flip", "truncate", "edit", "resigned", "swap", "link", "folder", "empty",
                               "list"]}


def fuzz_run_folder(runs: dict[str, Path], name: str, scratch: Path, capsys: pytest.CaptureFixture
                    ) -> list[tuple[str, str]]:
    """The seeded cases on ``name`` (checkpoint.pt of the stopped run, metrics.json of the finished one)."""
    import shutil

    source, other = ("stopped", "stopped7") if name == "checkpoint.pt" else ("finished", "finished7")
    reference = scratch / "reference"
    shutil.copytree(runs[source], reference)
    code, ref_out, err = _resume(reference, capsys)
    assert code == 0, err
    ref = json.loads(ref_out)
    rng = random.Random(3600 + len(name))
    kinds = RUN_DAMAGE[name]
    cases = kinds + [rng.choice(kinds) for _ in range(RUN_CASES - len(kinds))]
    results = []
    for i, kind in enumerate(cases):
        folder = scratch / f"case{i}"
        shutil.copytree(runs[source], folder)
        damage_file(folder, name, kind, rng, runs[other] / name)
        before = _snapshot(folder)
        code, out, err = _resume(folder, capsys)
        lines = [line for line in err.splitlines() if line.strip()]
        assert "Traceback" not in err + out, f"{name} {kind}: {err}"
        if code == 0:
            got = json.loads(out)
            same = all(got.get(k) == ref.get(k) for k in ("accuracy", "final_train_loss", "seed", "settings",
                                                          "heads_off", "head_masks")) and _losses(got) == _losses(ref)
            assert same, f"{name} {kind} (case {i}): exit 0 with another result: {err}"
            results.append((kind, "identical"))
        else:
            assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), f"{name} {kind}: {err!r}"
            assert str(folder / name) in lines[0], f"{name} {kind}: the line does not name the file: {lines[0]}"
            assert _snapshot(folder) == before, f"{name} {kind}: the folder changed"
            results.append((kind, "refused"))
    return results


@pytest.mark.parametrize("name", sorted(RUN_DAMAGE))
def test_run_folder_damage_is_refused_or_harmless(runs: dict[str, Path], name: str, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    results = fuzz_run_folder(runs, name, tmp_path, capsys)
    report(f"{name} (resume)", results)
    # Content cut or replaced, another run's file, a link, a folder: always refused. A flipped bit or appended bytes
    # may fall where nothing is read (zip padding), and then the run must resume to the undamaged result (checked).
    assert all(outcome == "refused" for kind, outcome in results if kind not in ("append", "flip")), results
    assert sum(outcome == "refused" for kind, outcome in results if kind == "flip") >= 1, results


# ---------------------------------------------------------------------------------------------------------------------
# PEFT folders (issue 36): what `heartlora prune` reads. Each load ends in a one-line HeartLoRAError or loads; a load
# that gives other logits is allowed only where the folder holds a value that cannot be checked (UNCHECKED: a PEFT
# folder carries no checksum): lora_alpha, lora_dropout, a weight's value.

PEFT_CASES = 60 * SCALE


@pytest.fixture(scope="module")
def peft_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    pytest.importorskip("peft")
    from transformers import ViTConfig, ViTModel

    from heartlora.backbones import create_backbone
    from heartlora.integrations import export_peft

    root = tmp_path_factory.mktemp("fuzz_peft")
    torch.manual_seed(0)
    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                       image_size=32, patch_size=8, attn_implementation="eager")).save_pretrained(root / "vit")

    def backbone() -> torch.nn.Module:
        torch.manual_seed(1)
        return create_backbone(f"hf:{root / 'vit'}", num_classes=5, img_size=32, pool="cls")

    for name, rank, seed in (("a", 3, 2), ("b", 2, 3)):
        model = backbone()
        hl.attach(model, hl.HeartLoRAConfig(targets=("q", "v"), rank=rank))
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in list(hl.adapter_parameters(model)) + list(model.head.parameters()):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        export_peft(model, root / name)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    return {"root": root, "backbone": backbone, "x": x}


def _peft_logits(folder: Path, env: dict[str, Any]) -> torch.Tensor:
    from heartlora.integrations import import_peft

    with torch.no_grad():
        return import_peft(folder, env["backbone"]()).eval()(env["x"])


def peft_mutation(folder: Path, other: Path, rng: random.Random) -> str:
    """Damage one file of a PEFT folder; returns the kind (``unchecked:`` for an edit no check can see)."""
    weights, config = folder / "adapter_model.safetensors", folder / "adapter_config.json"
    kind = rng.choice(["weights-empty", "weights-random", "weights-truncate", "weights-header", "weights-data",
                       "config-truncate", "config-flip", "config-list", "config-value", "swap-config", "swap-weights",
                       "link", "weights-nan"])
    data = weights.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    text = config.read_text()
    if kind == "weights-empty":
        weights.write_bytes(b"")
    elif kind == "weights-random":
        weights.write_bytes(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 4096))))
    elif kind == "weights-truncate":
        weights.write_bytes(data[:rng.randrange(len(data))])
    elif kind == "weights-header":
        weights.write_bytes(flip(data, 0, 8 + n, rng))
    elif kind == "weights-data":
        weights.write_bytes(flip(data, 8 + n, len(data), rng))
        kind = "unchecked:weights-data"  # another finite value is legal; a NaN or an infinity is refused
    elif kind == "weights-nan":
        tensors = dict(st_load(data))
        key = rng.choice(sorted(tensors))
        tensors[key] = tensors[key].clone().fill_(float("nan"))
        weights.write_bytes(st_save(tensors, metadata=split(data)[0].get("__metadata__")))
    elif kind == "config-truncate":
        config.write_text(text[:rng.randrange(len(text))])
    elif kind == "config-flip":
        config.write_bytes(flip(text.encode(), 0, len(text), rng))
        kind = "unchecked:config-flip"  # a flipped bit may give another legal value (a digit of lora_alpha)
    elif kind == "config-list":
        config.write_text("[]")
    elif kind == "config-value":
        doc = json.loads(text)
        key = rng.choice(["r", "lora_alpha", "lora_dropout"])
        doc[key] = rng.choice([0, -1, 2 * (doc[key] or 1), float("nan"), 1e9, "x", None])
        config.write_text(json.dumps(doc))
        kind = f"unchecked:config-{key}" if key != "r" else "config-r"
    elif kind == "swap-config":
        config.write_bytes((other / "adapter_config.json").read_bytes())
    elif kind == "swap-weights":
        weights.write_bytes((other / "adapter_model.safetensors").read_bytes())
    else:  # a link in place of the weights, to another folder's: read as that folder's (PEFT folders are not ours)
        weights.unlink()
        weights.symlink_to(other / "adapter_model.safetensors")
        kind = "unchecked:link"
    return kind


def fuzz_peft(env: dict[str, Any], scratch: Path) -> list[tuple[str, str]]:
    import shutil

    reference = _peft_logits(env["root"] / "a", env)
    rng = random.Random(3636)
    results = []
    for case in range(PEFT_CASES):
        folder = scratch / f"case{case}"
        shutil.copytree(env["root"] / "a", folder)
        kind = peft_mutation(folder, env["root"] / "b", rng)
        try:
            logits = _peft_logits(folder, env)
            outcome = "identical" if torch.equal(logits, reference) else "other output"
        except HeartLoRAError as e:
            assert str(e) and "\n" not in str(e), f"case {case} ({kind}): {e!r}"
            outcome = "refused"
        except Exception as e:  # the point of the fuzz: name the case that escaped
            raise AssertionError(f"case {case} ({kind}) raised {type(e).__name__}: {e}") from e
        results.append((kind, outcome))
    return results


def test_peft_folder_damage_is_one_line_or_an_unchecked_value(peft_folders: dict[str, Any], tmp_path: Path) -> None:
    results = fuzz_peft(peft_folders, tmp_path)
    report("PEFT folder (import_peft, what prune reads)", results)
    assert not [r for r in results if r[1] == "other output" and not r[0].startswith("unchecked:")], results
    assert sum(outcome == "refused" for _, outcome in results) >= len(results) // 2


def test_prune_of_a_damaged_peft_folder_is_one_line(peft_folders: dict[str, Any], tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    """The issue's invocations: `heartlora prune` on an empty / truncated weights file or a truncated config."""
    import shutil

    from heartlora.cli.main import main

    for i, (name, damage) in enumerate([("adapter_model.safetensors", lambda b: b""),
                                        ("adapter_model.safetensors", lambda b: b[:len(b) // 2]),
                                        ("adapter_config.json", lambda b: b[:len(b) // 2])]):
        folder = tmp_path / f"p{i}"
        shutil.copytree(peft_folders["root"] / "a", folder)
        (folder / name).write_bytes(damage((folder / name).read_bytes()))
        before = _snapshot(tmp_path)
        capsys.readouterr()
        assert main(["prune", str(folder), "--task", "digits", "--ne", "1", "--backbone",
                     f"hf:{peft_folders['root'] / 'vit'}"]) == 2
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and str(folder / name) in lines[0] and "Traceback" not in err, err
        assert _snapshot(tmp_path) == before  # no .pruned.safetensors, nothing else written


# ---------------------------------------------------------------------------------------------------------------------
# Bad command lines (issue 36): every numeric flag of every command at nan, inf, 0 and -1. A value outside the
# flag's range (heartlora.engine.settings.RANGES, the CLI's OTHER_RANGES) must be refused in one line naming the flag,
# exit 2, with nothing written; values inside the range are the table's "accepted" cases (not run: they would train).

BAD_VALUES = ("nan", "inf", "0", "-1")
CONTEXT = {"train": [], "demo": [], "eval": ["--adapter", "A"], "predict": ["--adapter", "A", "img.png"],
           "serve": ["--adapter", "A"], "prune": ["P", "--task", "digits"], "data export": ["digits", "D"]}
ISSUE_CASES = [("train", "--seed", "-1"), ("eval", "--seed", "-1"), ("eval", "--img-size", "0"),
               ("train", "--lr", "nan"), ("eval", "--batch-size", "0"), ("serve", "--port", "70000"),
               ("serve", "--max-batch", "0"), ("train", "--img-size", "0")]


def numeric_flags() -> list[tuple[str, str, Any]]:
    """(command, flag, its argparse type) for every flag of every command that takes a number."""
    import argparse

    from heartlora.cli.main import build_parser

    found = []

    def walk(parser: argparse.ArgumentParser, prefix: str) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, f"{prefix} {name}".strip())
            elif action.option_strings and (action.type in (int, float) or hasattr(action.type, "rule")):
                found.append((prefix, action.option_strings[0], action.type))
    walk(build_parser(), "")
    return found


def bad_cli_cases() -> list[tuple[str, str, str, bool]]:
    """(command, flag, value, refused?) for every numeric flag at BAD_VALUES, then the issue's own cases."""

    cases = []
    for command, flag, parse in numeric_flags():
        for value in BAD_VALUES:
            try:
                parse(value)
                cases.append((command, flag, value, False))
            except Exception:  # noqa: BLE001 (argparse's ArgumentTypeError, or a HeartLoRAError)
                cases.append((command, flag, value, True))
    return cases + [(c, f, v, True) for c, f, v in ISSUE_CASES]


# The flags for which 0 is a legal value, written out here rather than read from the range table, so that a range
# that starts accepting 0 (or stops) fails a test instead of moving a case from "refused" to "in range".
ZERO_ALLOWED = {("train", f) for f in ("--seed", "--ne", "--ne-fraction", "--ne-tolerance", "--dropout", "--score-ema",
                                       "--warmup-epochs", "--min-lr-ratio", "--weight-decay", "--drop-path")} | {
    ("eval", "--seed"), ("prune", "--ne"), ("prune", "--seed"), ("prune", "--score-seed"), ("prune", "--ne-tolerance"),
    ("serve", "--port"), ("serve", "--max-wait-ms")}


def test_every_number_flag_is_range_checked() -> None:
    """No numeric flag escapes the table: each is parsed by heartlora.cli.common.number (not a bare int or float),
    refuses nan, inf and -1, and accepts 0 exactly where ZERO_ALLOWED says so."""
    flags = numeric_flags()
    assert len(flags) >= 30
    plain = [(c, f) for c, f, t in flags if t in (int, float)]
    assert not plain, f"flags with a bare int/float type, outside RANGES: {plain}"
    accepted = {(c, f, v) for c, f, v, refused in bad_cli_cases() if not refused}
    assert not {case for case in accepted if case[2] != "0"}, "a numeric flag accepts nan, inf or -1"
    assert {(c, f) for c, f, _ in accepted} == ZERO_ALLOWED


@pytest.mark.parametrize("command", sorted(CONTEXT))
def test_bad_numbers_on_the_command_line_are_one_line(command: str, tmp_path: Path, capsys: pytest.CaptureFixture,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from heartlora.cli.main import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "keep.txt").write_text("a user's file\n")
    cases = [c for c in bad_cli_cases() if c[0] == command and c[3]]
    assert cases
    with capsys.disabled():
        report(f"heartlora {command} (numeric flags)", [(v, "refused" if refused else "in range: " + f)
                                                         for c, f, v, refused in bad_cli_cases() if c == command])
    for _, flag, value, _ in cases:
        capsys.readouterr()
        code = main([*command.split(), *CONTEXT[command], flag, value])
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip()]
        named = (f"error: {flag} {value} ", f"error: {flag} '{value}' ")  # the value as given, or quoted (text)
        assert code == 2 and len(lines) == 1 and lines[0].startswith(named), (flag, value, err)
        assert "Traceback" not in err
        assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"], (flag, value)


if __name__ == "__main__":  # the outcome counts quoted in docs/RELIABILITY.md: python tests/test_fuzz.py
    import logging
    import tempfile
    from collections import Counter

    logging.disable(logging.WARNING)  # one format-1 warning per load otherwise
    torch.set_num_threads(1)
    # the cases the tests above run: raw damage to format 2 (float, 1-bit) and format 3 (float16 values, bfloat16
    # statistics), re-signed damage in formats 2 and 1, and in format 3 at float16
    two, three = [(32, None), (1, None)], [(32, "float16"), (1, "bfloat16")]
    for label, version, files in [("raw, format 2", None, two), ("raw, format 3", None, three),
                                  ("re-signed, format 2", 2, two), ("re-signed, format 1", 1, two),
                                  ("re-signed, format 3", 3, [(32, "float16"), (1, "float16")])]:
        counts: Counter = Counter()
        for bits, dtype in files:
            with tempfile.TemporaryDirectory() as tmp:
                counts.update(outcome for _, outcome in fuzz(Path(tmp), bits, version, dtype))
        print(label, dict(counts))
