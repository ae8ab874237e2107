"""Adapter files: round trips, the byte counts of SPEC §4, and refusing bad files."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from conftest import make_family
from test_method import randomize

import heartlora.method as hl
from heartlora.errors import AdapterFileError


@pytest.mark.parametrize("bits", [32, 1, 2])
def test_save_load_gives_identical_logits(family: str, bits: int, tmp_path: Path) -> None:
    model, x = make_family(family)
    hl.attach(model, hl.HeartLoRAConfig(targets=("q", "v", "o"), rank=4, bits=bits))
    randomize(model)
    with torch.no_grad():
        for p in (model.head if hasattr(model, "head") else model.heads).parameters():
            p.add_(1.0)  # the classifier must travel with the adapter
    layer = hl.attention_layers(model)[-1]
    hl.deactivate_heads(model, heads=[(layer.name, 0), (layer.name, 2)])
    y = model(x)
    report = hl.save_adapter(model, tmp_path / "a.safetensors")
    fresh, _ = make_family(family)
    loaded = hl.load_adapter(fresh, tmp_path / "a.safetensors")
    assert hl.head_masks(loaded) == hl.head_masks(model)
    assert torch.allclose(loaded(x), y, atol=1e-6, rtol=0)
    assert report.heads_on == report.heads_total - 2


def test_vit_base_byte_count_matches_bi_lora(tmp_path: Path) -> None:
    """ViT-B/16, q and v, rank 32, 1 bit: 12 × (2 × (768·32 + 32·768) / 8 + 4 × 8) = 147,840 bytes; each head
    switched off saves its 64 rows × 32 × 1 bit of B in q and in v = 512 bytes."""
    import timm
    model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=10)
    hl.attach(model, hl.HeartLoRAConfig(targets=("q", "v"), rank=32, bits=1))
    assert hl.save_adapter(model, tmp_path / "b.safetensors").adapter_bytes == 147_840
    hl.deactivate_heads(model, heads=[("blocks.0.attn", 3)])
    assert hl.save_adapter(model, tmp_path / "b.safetensors").adapter_bytes == 147_840 - 512
    hl.deactivate_heads(model, heads=[("blocks.5.attn", h) for h in range(4)])
    assert hl.save_adapter(model, tmp_path / "b.safetensors").adapter_bytes == 147_840 - 5 * 512


def test_float_adapter_bytes_count_active_rows_only(tmp_path: Path) -> None:
    model, _ = make_family("hf_dinov2")  # 2 layers, 4 heads of 8, hidden 32
    hl.attach(model, hl.HeartLoRAConfig(targets=("q", "v"), rank=4))
    per_layer = 2 * (4 * 32 + 32 * 4) * 4
    assert hl.save_adapter(model, tmp_path / "f.safetensors").adapter_bytes == 2 * per_layer
    name = hl.attention_layers(model)[1].name
    hl.deactivate_heads(model, heads=[(name, h) for h in range(4)])  # a whole layer off: A goes too
    assert hl.save_adapter(model, tmp_path / "f.safetensors").adapter_bytes == per_layer


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    model, _ = make_family("timm_vit")
    hl.attach(model, hl.HeartLoRAConfig(rank=4))
    randomize(model)
    path = tmp_path / "a.safetensors"
    hl.save_adapter(model, path)
    return path


def test_truncated_file_is_refused(saved: Path) -> None:
    data = saved.read_bytes()
    saved.write_bytes(data[: len(data) - 100])
    with pytest.raises(AdapterFileError, match="corrupt or truncated"):
        hl.load_adapter(make_family("timm_vit")[0], saved)


def test_flipped_header_byte_is_refused(saved: Path) -> None:
    data = bytearray(saved.read_bytes())
    n = struct.unpack("<Q", data[:8])[0]
    header = data[8:8 + n].decode()
    i = header.index("format_version")  # break the JSON of the metadata
    data[8 + i - 2] = ord("#")
    saved.write_bytes(bytes(data))
    with pytest.raises(AdapterFileError):
        hl.load_adapter(make_family("timm_vit")[0], saved)


def test_flipped_data_byte_is_refused(saved: Path) -> None:
    data = bytearray(saved.read_bytes())
    data[-5] ^= 0x40
    saved.write_bytes(bytes(data))
    with pytest.raises(AdapterFileError, match="checksum"):
        hl.load_adapter(make_family("timm_vit")[0], saved)


def test_file_for_another_backbone_is_refused(saved: Path) -> None:
    other, _ = make_family("timm_vit", seed=123)  # same architecture, other weights
    with pytest.raises(AdapterFileError, match="other weights"):
        hl.load_adapter(other, saved)
    with pytest.raises(AdapterFileError):
        hl.load_adapter(make_family("hf_vit")[0], saved, check_fingerprint=False)


def test_not_an_adapter_and_missing_files(tmp_path: Path) -> None:
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(AdapterFileError, match="without heartlora metadata"):
        hl.read_adapter_info(tmp_path / "plain.safetensors")
    with pytest.raises(AdapterFileError, match="does not exist"):
        hl.read_adapter_info(tmp_path / "missing.safetensors")


def test_metadata_describes_the_adapter(saved: Path) -> None:
    info = hl.read_adapter_info(saved)
    assert info["config"]["targets"] == ["q", "v"] and info["config"]["rank"] == 4
    assert [layer["num_heads"] for layer in info["layers"]] == [4, 4]
    assert json.loads(json.dumps(info)) == info
