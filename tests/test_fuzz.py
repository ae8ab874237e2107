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


def write_run_file(path: Path, bits: int) -> torch.Tensor:
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
    hl.save_adapter(model, path, extra_metadata={RUN_KEY: run})
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


def fuzz(folder: Path, bits: int, version: int | None) -> list[tuple[str, str]]:
    """Run the seeded cases on a fresh run file in ``folder``: raw damage when ``version`` is None, else re-signed
    damage in that format. Returns (what was done, outcome) with outcome "identical", "other output" or "refused";
    any exception other than a one-line HeartLoRAError propagates, naming the case."""
    good = folder / "adapter.safetensors"
    x = write_run_file(good, bits)
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


@pytest.mark.parametrize("bits", [32, 1])
def test_raw_damage_gives_the_original_logits_or_an_error(bits: int, tmp_path: Path) -> None:
    results = fuzz(tmp_path, bits, None)
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


if __name__ == "__main__":  # the outcome counts quoted in docs/RELIABILITY.md: python tests/test_fuzz.py
    import logging
    import tempfile
    from collections import Counter

    logging.disable(logging.WARNING)  # one format-1 warning per load otherwise
    torch.set_num_threads(1)
    for version in (None, 2, 1):
        counts: Counter = Counter()
        for bits in (32, 1):
            with tempfile.TemporaryDirectory() as tmp:
                counts.update(outcome for _, outcome in fuzz(Path(tmp), bits, version))
        print("raw" if version is None else f"re-signed, format {version}", dict(counts))
