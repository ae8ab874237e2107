"""Adapter files: round trips, the byte counts of docs/METHOD.md §4, and refusing bad files."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from conftest import make_family
from test_method import randomize

import heartlora.method as hl
from heartlora.errors import AdapterFileError, ConfigError


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


def test_an_adapter_loaded_inside_autocast_is_the_one_that_runs_there(tmp_path: Path) -> None:
    """Loading inside an autocast block, then running in that same block, uses the loaded weights (autocast caches
    half-precision copies of weights, and a load writes into weights in place)."""
    model, x = make_family("timm_vit")
    hl.attach(model, hl.HeartLoRAConfig(targets=("q", "v"), rank=4))
    randomize(model)
    with torch.no_grad():
        for p in model.head.parameters():
            p.add_(1.0)
    hl.save_adapter(model, tmp_path / "a.safetensors")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        loaded = hl.load_adapter(make_family("timm_vit")[0], tmp_path / "a.safetensors")
        inside = loaded(x).float()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        fresh_block = loaded(x).float()
    torch.testing.assert_close(inside, fresh_block, atol=0, rtol=0)


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


def test_a_backbone_cast_to_another_dtype_is_named_as_the_cause(saved: Path) -> None:
    with pytest.raises(AdapterFileError, match="weights are bfloat16 and the fingerprint covers dtypes"):
        hl.load_adapter(make_family("timm_vit")[0].to(torch.bfloat16), saved)


def test_save_names_diverged_weights(tmp_path: Path) -> None:
    """A NaN adapter (fp16 weights under AdamW) used to be reported as a "corrupt" file of the right dtype/shape."""
    from heartlora.errors import ConfigError
    model, _ = make_family("timm_vit")
    hl.attach(model, hl.HeartLoRAConfig(rank=2))
    with torch.no_grad():
        hl.adapter_parameters(model)[0].fill_(float("nan"))
    with pytest.raises(ConfigError, match="holds NaN or infinite values, so training diverged"):
        hl.save_adapter(model, tmp_path / "a.safetensors")
    assert not (tmp_path / "a.safetensors").exists()


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


# ---------------------------------------------------------------------------------------------------------------------
# Issue 10: metadata under a checksum, every field checked before anything is allocated, file-named backbones never
# downloaded, and every file heartlora writes usable by inspect, eval and predict.


def _resigned(path: Path, edit, version: int = 2) -> Path:
    """A copy of ``path`` whose metadata ``edit`` changed, with checksums that match (a careful editor's file)."""
    from test_fuzz import parts, resign
    tensors, meta = parts(path.read_bytes())
    edit(meta, tensors)
    out = path.with_name(f"edited_v{version}.safetensors")
    out.write_bytes(resign(tensors, meta, version))
    return out


def _set(*keys_and_value):
    *keys, value = keys_and_value

    def edit(meta, tensors):
        d = meta
        for k in keys[:-1]:
            d = d[k]
        d[keys[-1]] = value
    return edit


@pytest.fixture
def run_file(tmp_path: Path) -> Path:
    import timm

    if "test_vit" not in timm.list_models("test_vit"):  # timm's test models came after 1.0.3 (compat stage)
        pytest.skip(f"timm {timm.__version__} has no test_vit model; this test runs in the main environment")
    from test_fuzz import write_run_file
    path = tmp_path / "adapter.safetensors"
    write_run_file(path, 1)
    return path


def test_format_1_files_load_with_a_warning(run_file: Path, caplog: pytest.LogCaptureFixture) -> None:
    from test_fuzz import load_logits
    x = torch.rand(2, 3, 32, 32)
    v1 = _resigned(run_file, lambda meta, tensors: None, version=1)
    assert b"heartlora_sha256" not in v1.read_bytes() and b"heartlora_sha256" in run_file.read_bytes()
    with caplog.at_level("WARNING"):
        assert torch.equal(load_logits(v1, x), load_logits(run_file, x))
    assert "format-1" in caplog.text and "no checksum" in caplog.text
    with pytest.raises(AdapterFileError, match="rank"):  # its fields are checked all the same
        hl.read_adapter_info(_resigned(run_file, _set("config", "rank", 10**9), version=1))
    from safetensors.torch import save_file
    from test_fuzz import parts
    tensors, meta = parts(run_file.read_bytes())
    save_file(tensors, str(v1), metadata={"heartlora": json.dumps(meta)})  # format 2 that lost its checksum
    with pytest.raises(AdapterFileError, match="checksum is missing"):
        hl.read_adapter_info(v1)


@pytest.mark.parametrize("edit, match", [
    (_set("config", "bits", 2), "shape|codes"),                       # bits changed: the codes do not fit
    (_set("config", "bits", 5.0), "bits"),
    (_set("config", [1, 2]), "config is not a JSON object"),          # a list where an object belongs
    (_set("layers", {"a": 1}), "layer list"),
    (_set("config", "rank", 10**9), "rank"),                          # would request gigabytes
    (_set("config", "rank", 8), "rank 8"),                            # a legal rank the tensors disagree with
    (_set("backbone", "num_classes", 10**9), "num_classes"),
    (_set("backbone", "num_classes", 4), "disagrees with its classifier"),
    (_set("backbone", "img_size", 10**5), "img_size"),
    (_set("backbone", "img_size", 10**6), "img_size"),
    (_set("backbone", "img_size", -32), "img_size"),
    (_set("extra", "heartlora_run", "img_size", 10**6), "run facts"),
    (_set("extra", "heartlora_run", "class_names", ["a", "b"]), "2 classes"),
    (_set("shapes", "adapter.backbone.blocks.0.attn.q.A", [-4, 64]), "shape"),
    (_set("shapes", "adapter.backbone.blocks.0.attn.q.A", [4, 2**40]), "shape"),
    (_set("shapes", "adapter.backbone.blocks.0.attn.q.A", [4, 65]), "codes"),
    (_set("layers", 0, "head_mask", [True]), "layer entry 0"),
    (_set("layers", 0, "num_heads", 10**6), "layer entry 0"),
])
def test_bad_fields_are_refused_before_anything_is_built(run_file: Path, edit, match: str,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from test_fuzz import memory_cap

    import heartlora.backbones
    from heartlora.engine.inference import load_trained

    def never(*args, **kwargs):
        raise AssertionError("a backbone was built for a file that should have been refused")
    monkeypatch.setattr(heartlora.backbones, "create_backbone", never)
    monkeypatch.setattr(hl.storage, "attach", never)
    bad = _resigned(run_file, edit)
    with memory_cap(), pytest.raises(AdapterFileError, match=match):
        load_trained(bad)


def test_cli_maps_bad_files_to_one_line_and_exit_2(run_file: Path, capsys: pytest.CaptureFixture) -> None:
    from heartlora.cli.main import EXIT_ERROR, main
    bad = _resigned(run_file, _set("config", "rank", 10**9))
    image = run_file.with_name("x.png")
    from PIL import Image
    Image.new("RGB", (32, 32)).save(image)
    for argv in (["inspect", str(bad)], ["eval", "--adapter", str(bad)],
                 ["predict", "--adapter", str(bad), str(image)]):
        assert main(argv) == EXIT_ERROR
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and "rank" in err, err


def _hf_backbone(tmp_path: Path, seed: int = 0):
    """A local Hugging Face folder with weights (tiny ViT), and a classifier built from it as a user would."""
    from transformers import ViTConfig, ViTModel

    from heartlora.backbones import create_backbone
    folder = tmp_path / "tiny-vit"
    if not folder.exists():
        torch.manual_seed(seed)
        cfg = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64)
        ViTModel(cfg, add_pooling_layer=False).save_pretrained(folder)
    return folder, create_backbone(f"hf:{folder}", num_classes=4, img_size=32, pretrained=True)


def test_a_backbone_named_by_a_file_is_never_downloaded(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Item 9: a file naming ``hf:some-user/some-vit`` says what it needs; ``--backbone`` builds the user's choice."""
    from PIL import Image

    import heartlora.backbones
    from heartlora.backbones import download_needed
    from heartlora.cli.main import EXIT_ERROR, main

    folder, model = _hf_backbone(tmp_path)
    model._spec["name"] = "hf:some-user/some-vit"  # as if trained online on a hub model
    hl.attach(model, hl.HeartLoRAConfig(rank=2))
    path = tmp_path / "hub.safetensors"
    hl.save_adapter(model, path)
    image = tmp_path / "x.png"
    Image.new("RGB", (20, 20), "red").save(image)

    real = heartlora.backbones.create_hf

    def offline(*args, **kwargs):
        raise AssertionError("heartlora tried to build a hub backbone a file named")
    monkeypatch.setattr(heartlora.backbones, "create_hf", offline)
    capsys.readouterr()
    assert main(["predict", "--adapter", str(path), str(image)]) == EXIT_ERROR
    err = capsys.readouterr().err
    assert "'hf:some-user/some-vit'" in err and "--backbone" in err and len(err.strip().splitlines()) == 1
    monkeypatch.setattr(heartlora.backbones, "create_hf", real)
    assert main(["predict", "--adapter", str(path), str(image), "--backbone", f"hf:{folder}", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)[0]["top"]) == 4

    assert download_needed("hf:some-user/some-vit", pretrained=False)  # even its config is on the hub
    assert download_needed("vit_tiny_patch16_224", pretrained=True)
    assert download_needed("vit_tiny_patch16_224", pretrained=False) is None
    assert download_needed(f"hf:{folder}", pretrained=True) is None and download_needed("dinov2_small", True) is None


def test_api_saved_adapters_can_be_inspected_evaluated_and_used(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Item 12: a file from ``save_adapter`` (no run facts) works with inspect, eval (given --task) and predict."""
    from tiny_task import write_tiny_vtab

    from heartlora.cli.main import EXIT_ERROR, main
    task = write_tiny_vtab(tmp_path / "task")
    _, model = _hf_backbone(tmp_path)
    hl.attach(model, hl.HeartLoRAConfig(rank=2, bits=1))
    layer = hl.attention_layers(model)[0].name
    hl.deactivate_heads(model, heads=[(layer, 1)])
    path = tmp_path / "api.safetensors"
    hl.save_adapter(model, path)

    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "3 of 4" in out and "tiny-vit" in "".join(out.split())
    assert main(["eval", "--adapter", str(path)]) == EXIT_ERROR
    assert "pass --task" in capsys.readouterr().err
    assert main(["eval", "--adapter", str(path), "--task", task, "--split", "val200", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    images, labels = __import__("heartlora.data", fromlist=["get_task"]).get_task(task).load("val200", img_size=32)
    with torch.no_grad():
        expected = (model.eval()(images.float() / 255).argmax(1) == labels).float().mean().item()
    assert result["accuracy"] == pytest.approx(expected) and result["images"] == 32
    image = next(Path(task.split(":", 1)[1]).glob("test_*.png"))
    assert main(["predict", "--adapter", str(path), str(image), "--json", "--top-k", "2"]) == 0
    top = json.loads(capsys.readouterr().out)[0]["top"]
    assert [t["label"] for t in top] == [str(t["index"]) for t in top]  # no class names: indices


def test_adapters_of_models_heartlora_did_not_build(saved: Path, capsys: pytest.CaptureFixture) -> None:
    """A raw timm model has no spec to rebuild it from: inspect works, eval says to load it in Python."""
    from heartlora.cli.main import EXIT_ERROR, main
    assert main(["inspect", str(saved), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["adapter"]["backbone"] == {"name": "VisionTransformer"}
    assert main(["eval", "--adapter", str(saved), "--task", "digits"]) == EXIT_ERROR
    assert "heartlora.load_adapter(your_backbone, path)" in capsys.readouterr().err


def test_save_refuses_metadata_it_could_not_read_back(tmp_path: Path) -> None:
    from heartlora.errors import ConfigError
    model, _ = make_family("timm_vit")
    hl.attach(model, hl.HeartLoRAConfig(rank=2))
    with pytest.raises(ConfigError, match="could not read back"):
        hl.save_adapter(model, tmp_path / "a.safetensors", extra_metadata={"x": torch.zeros(1)})
    with pytest.raises(ConfigError, match="could not read back"):
        hl.save_adapter(model, tmp_path / "a.safetensors", extra_metadata={"x": float("nan")})
    assert not (tmp_path / "a.safetensors").exists()


class _Payload:
    """Unpickling this would create a file: the proof that an adapter loader executed code from a file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_pickle_posing_as_an_adapter_runs_nothing(tmp_path: Path) -> None:
    import pickle
    marker = tmp_path / "executed"
    for i, write in enumerate([lambda p: p.write_bytes(pickle.dumps(_Payload(marker))),
                               lambda p: torch.save({"w": torch.ones(2), "x": _Payload(marker)}, p)]):
        path = tmp_path / f"evil{i}.safetensors"
        write(path)
        with pytest.raises(AdapterFileError):
            hl.load_adapter(make_family("timm_vit")[0], path)
        with pytest.raises(AdapterFileError):
            hl.read_adapter_info(path)
    assert not marker.exists()


def test_a_failed_save_keeps_the_previous_file(saved: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = saved.read_bytes()
    model, _ = make_family("timm_vit")
    hl.attach(model, hl.HeartLoRAConfig(rank=4))

    def disk_full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(hl.storage, "save_file", disk_full)
    with pytest.raises(OSError):
        hl.save_adapter(model, saved)
    assert saved.read_bytes() == before and [p.name for p in saved.parent.iterdir()] == [saved.name]


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_a_saved_adapter_gets_the_permissions_the_umask_gives(tmp_path: Path, umask: int) -> None:
    """safetensors writes its file as 0600 whatever the umask; a saved adapter must be readable as any file the user
    writes is (an adapter another account serves was unreadable)."""
    import os
    import stat

    model, _ = make_family("timm_vit")
    hl.attach(model, hl.HeartLoRAConfig(rank=4))
    before = os.umask(umask)
    try:
        hl.save_adapter(model, tmp_path / "a.safetensors")
    finally:
        os.umask(before)
    assert stat.S_IMODE((tmp_path / "a.safetensors").stat().st_mode) == 0o666 & ~umask


def test_a_refused_load_leaves_the_backbone_as_it_came(saved: Path) -> None:
    """The file's classifier does not fit (7 classes, not 5): the error used to leave adapters attached and every
    weight frozen, so a retry on the same backbone was refused as "already has heartlora adapters"."""
    import timm

    other = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                              embed_dim=32, num_heads=4, num_classes=7)
    before = {n: (p.detach().clone(), p.requires_grad) for n, p in other.named_parameters()}
    modules = {n: type(m) for n, m in other.named_modules()}
    with pytest.raises(AdapterFileError, match="does not fit this backbone"):
        hl.load_adapter(other, saved, check_fingerprint=False)
    assert not hl.is_adapted(other) and {n: type(m) for n, m in other.named_modules()} == modules
    assert all(torch.equal(p, before[n][0]) and p.requires_grad == before[n][1] for n, p in other.named_parameters())
    fresh, x = make_family("timm_vit")
    hl.load_adapter(fresh, saved)  # a right backbone still loads
    with pytest.raises(AdapterFileError, match="does not fit"):
        hl.load_adapter(other, saved, check_fingerprint=False)  # and the same refusal again, not "already adapted"


def test_a_run_folder_stands_for_its_adapter_file(saved: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "adapter.safetensors").write_bytes(saved.read_bytes())
    model, x = make_family("timm_vit")
    hl.load_adapter(model, run)  # used to say "adapter file run does not exist" for a folder that does
    assert hl.read_adapter_info(run)["config"] == hl.read_adapter_info(saved)["config"]
    with pytest.raises(AdapterFileError, match="is a folder without adapter.safetensors"):
        hl.read_adapter_info(tmp_path)


# ---------------------------------------------------------------------------------------------------------------------
# Storage precision: an adapter stored at float16 or bfloat16 (half the bytes), read back as float32.


def _factors(model) -> dict[str, torch.Tensor]:
    return {f"{layer.name}.{t}.{f}": getattr(proj, f"lora_{f}").detach().clone()
            for layer in hl.attention_layers(model) for t, proj in layer.projections.items() for f in ("A", "B")}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_half_precision_adapter_stores_half_the_bytes_and_loads_the_rounded_values(tmp_path: Path,
                                                                                      dtype: torch.dtype) -> None:
    model, x = make_family("timm_vit")
    hl.attach(model, hl.HeartLoRAConfig(rank=4))
    randomize(model)
    full = hl.save_adapter(model, tmp_path / "fp32.safetensors")
    half = hl.save_adapter(model, tmp_path / "half.safetensors", dtype=str(dtype).removeprefix("torch."))
    assert half.adapter_bytes * 2 == full.adapter_bytes and half.head_bytes == full.head_bytes
    info = hl.read_adapter_info(tmp_path / "half.safetensors")
    assert info["format_version"] == 3 and info["dtype"] == str(dtype).removeprefix("torch.")
    plain = hl.read_adapter_info(tmp_path / "fp32.safetensors")
    assert plain["format_version"] == 2 and "dtype" not in plain  # a float32 file: older heartlora reads it
    loaded = hl.load_adapter(make_family("timm_vit")[0], tmp_path / "half.safetensors")
    for key, value in _factors(model).items():  # each value rounded once, computed with as float32
        got = _factors(loaded)[key]
        assert got.dtype == torch.float32 and torch.equal(got, value.to(dtype).float()), key
    assert not torch.equal(loaded(x), model(x))  # rounded: not the float32 model's logits
    torch.testing.assert_close(loaded(x), model(x), rtol=0.05, atol=0.05)


def test_a_one_bit_adapter_stores_its_mean_and_std_at_the_chosen_precision(tmp_path: Path) -> None:
    model, x = make_family("timm_vit")
    hl.attach(model, hl.HeartLoRAConfig(rank=4, bits=1))
    randomize(model)
    full = hl.save_adapter(model, tmp_path / "a.safetensors")
    half = hl.save_adapter(model, tmp_path / "b.safetensors", dtype="fp16")
    matrices = len(hl.read_adapter_info(tmp_path / "a.safetensors")["shapes"])
    assert full.adapter_bytes - half.adapter_bytes == 4 * matrices  # 2 values of 4 bytes → of 2 bytes each
    torch.testing.assert_close(hl.load_adapter(make_family("timm_vit")[0], tmp_path / "b.safetensors")(x),
                               hl.load_adapter(make_family("timm_vit")[0], tmp_path / "a.safetensors")(x),
                               rtol=1e-2, atol=1e-2)


def test_convert_adapter_equals_saving_at_that_precision_and_widens_back_exactly(tmp_path: Path) -> None:
    from heartlora.method import storage
    model, _ = make_family("timm_vit")
    hl.attach(model, hl.HeartLoRAConfig(rank=4))
    randomize(model)
    hl.save_adapter(model, tmp_path / "fp32.safetensors", extra_metadata={"note": "kept"})
    hl.save_adapter(model, tmp_path / "saved16.safetensors", extra_metadata={"note": "kept"}, dtype=torch.float16)
    report = hl.convert_adapter(tmp_path / "fp32.safetensors", tmp_path / "conv16.safetensors", "float16")
    saved, conv = (storage._read(tmp_path / f"{n}.safetensors") for n in ("saved16", "conv16"))
    assert saved[0] == conv[0] and report.adapter_bytes == saved[0]["adapter_bytes"]
    assert {t.dtype for t in conv[1].values()} == {torch.float32}  # every reader gets float32 values
    assert all(torch.equal(saved[1][k], conv[1][k]) for k in saved[1]) and conv[0]["extra"] == {"note": "kept"}
    hl.convert_adapter(tmp_path / "conv16.safetensors", tmp_path / "back.safetensors", "fp32")
    back = storage._read(tmp_path / "back.safetensors")
    assert back[0]["format_version"] == 2 and "dtype" not in back[0]
    assert all(torch.equal(back[1][k], conv[1][k]) for k in back[1])  # float16 → float32 is exact
    with pytest.raises(ConfigError, match="choose float32, float16 or bfloat16"):
        hl.convert_adapter(tmp_path / "fp32.safetensors", tmp_path / "x.safetensors", "int8")
    assert not (tmp_path / "x.safetensors").exists()


def test_values_beyond_float16s_range_are_refused_and_bfloat16_keeps_them(tmp_path: Path) -> None:
    model, _ = make_family("timm_vit")
    hl.attach(model, hl.HeartLoRAConfig(rank=4))
    randomize(model)
    with torch.no_grad():
        hl.attention_layers(model)[0].projections["q"].lora_B[0, 0] = 1e5
    with pytest.raises(ConfigError, match=r"cannot store .* as float16: adapter\..*\.q\.B holds values beyond its "
                                             r"range \(largest 65504\)") as err:
        hl.save_adapter(model, tmp_path / "a.safetensors", dtype="float16")
    assert "\n" not in str(err.value) and not (tmp_path / "a.safetensors").exists()
    hl.save_adapter(model, tmp_path / "a.safetensors", dtype="bfloat16")
    assert hl.load_adapter(make_family("timm_vit")[0], tmp_path / "a.safetensors") is not None
    with torch.no_grad():  # a matrix of values below float16's normal range (6e-5) would lose most of its bits
        b = hl.attention_layers(model)[0].projections["q"].lora_B
        b.copy_(torch.randn(b.shape, generator=torch.Generator().manual_seed(0)) * 3e-7)
    with pytest.raises(ConfigError, match=r"\.q\.B would change by [0-9.]+ % of its norm \(values too small for "
                                          r"float16"):
        hl.save_adapter(model, tmp_path / "b.safetensors", dtype="float16")
    hl.save_adapter(model, tmp_path / "b.safetensors", dtype="bfloat16")


@pytest.mark.parametrize(("edit", "version", "match"), [
    (_set("dtype", "float16"), 3, "tensor adapter.* is torch.float32"),  # says float16, holds float32
    (_set("dtype", "float16"), 2, "it names a dtype but is format version 2"),
    (_set("dtype", "int8"), 3, "its dtype 'int8' is not one of"),
    (_set("dtype", ["float16"]), 3, r"its dtype \['float16'\] is not one of"),
])
def test_a_files_storage_dtype_is_checked_against_its_version_and_tensors(saved: Path, edit, version: int,
                                                                           match: str) -> None:
    with pytest.raises(AdapterFileError, match=match):
        hl.load_adapter(make_family("timm_vit")[0], _resigned(saved, edit, version))


def test_export_writes_heartlora_at_another_precision_that_every_command_reads(saved: Path, tmp_path: Path,
                                                                              capsys: pytest.CaptureFixture) -> None:
    from heartlora.cli.main import EXIT_ERROR, main
    out = tmp_path / "small"
    assert main(["export", str(saved), str(out), "--format", "heartlora", "--dtype", "fp16"]) == 0
    said = capsys.readouterr().out
    before = hl.read_adapter_info(saved)["adapter_bytes"]
    assert f"({before // 2:,} bytes of adapter, {before:,} as float32" in said
    assert f"heartlora eval --adapter {out} --split" in said
    assert main(["inspect", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["adapter"]["dtype"] == "float16"
    assert main(["inspect", str(out)]) == 0
    assert "stored as" in capsys.readouterr().out
    assert main(["export", str(saved), str(out), "--format", "heartlora", "--dtype", "fp16"]) == EXIT_ERROR
    assert "already holds adapter.safetensors" in capsys.readouterr().err
    (tmp_path / "afile").write_text("x")
    assert main(["export", str(saved), str(tmp_path / "afile"), "--format", "heartlora", "--overwrite"]) == EXIT_ERROR
    assert "is a file, not a folder" in capsys.readouterr().err
    assert main(["export", str(saved), str(tmp_path / "p"), "--dtype", "fp16"]) == EXIT_ERROR
    assert "--dtype fp16 goes with --format heartlora" in capsys.readouterr().err
    assert main(["export", str(saved), str(tmp_path / "q"), "--format", "heartlora", "--dtype", "fp8"]) == EXIT_ERROR
    err = capsys.readouterr().err
    assert "choose float32, float16 or bfloat16" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("bits", [1, 2])
def test_a_loaded_kbit_adapter_saved_again_keeps_its_codes_and_statistics(tmp_path: Path, bits: int) -> None:
    """Decoded k-bit values have another std than the one they were decoded with: re-encoding them with their own
    statistics would store another model. Saved again (after a head is switched off too), a loaded adapter keeps its
    file's codes and (mean, std); once trained further it is quantized afresh."""
    from heartlora.method import quant, storage
    model, x = make_family("timm_vit")
    hl.attach(model, hl.HeartLoRAConfig(rank=4, bits=bits))
    randomize(model)
    hl.save_adapter(model, tmp_path / "a.safetensors")
    loaded = hl.load_adapter(make_family("timm_vit")[0], tmp_path / "a.safetensors")
    hl.save_adapter(loaded, tmp_path / "b.safetensors")
    a, b = (storage._read(tmp_path / f"{n}.safetensors")[1] for n in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    layer = hl.attention_layers(loaded)[0].name
    hl.deactivate_heads(loaded, heads=[(layer, 1)])
    with torch.no_grad():
        y = loaded(x)
        hl.save_adapter(loaded, tmp_path / "c.safetensors")
        again = hl.load_adapter(make_family("timm_vit")[0], tmp_path / "c.safetensors")
        torch.testing.assert_close(again(x), y, rtol=0, atol=0)
    proj = hl.attention_layers(loaded)[1].projections["q"]
    assert proj.decoded_stats() is not None
    # a write the version counter misses (p.data): the file's statistics no longer give these values back, so
    # saving encodes them afresh
    key = f"adapter.{hl.attention_layers(loaded)[1].name}.q.A"
    proj.lora_A.data.mul_(3.0)
    hl.save_adapter(loaded, tmp_path / "d.safetensors")
    d = storage._read(tmp_path / "d.safetensors")[1]
    fresh = quant.encode(proj.lora_A.detach().float(), bits)
    assert torch.equal(d[f"{key}.stats"], torch.stack(fresh[1:])) and not torch.equal(d[f"{key}.stats"],
                                                                                       a[f"{key}.stats"])
    with torch.no_grad():
        proj.lora_A.add_(0.01)  # trained further: latent weights again, statistics of their own
    assert proj.decoded_stats() is None
    # a cast and a write of the same values keep a loaded adapter decoded
    other = hl.load_adapter(make_family("timm_vit")[0], tmp_path / "a.safetensors").half()
    other.load_state_dict(other.state_dict())
    assert hl.attention_layers(other)[1].projections["q"].decoded_stats() is not None


def test_an_adapter_is_refused_on_a_backbone_that_normalises_its_images_otherwise(tmp_path: Path) -> None:
    """mean and std are buffers outside the fingerprint (a Hugging Face copy without its preprocessor_config.json
    builds ImageNet's pair): the file keeps them and load_adapter compares them."""
    import heartlora

    def build() -> torch.nn.Module:
        torch.manual_seed(0)
        return heartlora.create_backbone("vit_tiny_patch16_224", num_classes=3, img_size=32, pretrained=False)

    model = hl.attach(build(), hl.HeartLoRAConfig(rank=2))
    randomize(model)
    hl.save_adapter(model, tmp_path / "a.safetensors", extra_metadata={"note": "kept"})
    extra = hl.read_adapter_info(tmp_path / "a.safetensors")["extra"]
    assert extra["note"] == "kept" and extra["input_norm"]["mean"] == model.mean.reshape(-1).tolist()
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(hl.load_adapter(build(), tmp_path / "a.safetensors")(x), model(x))
    other = build()
    assert model.mean.flatten().tolist() == [0.5, 0.5, 0.5]  # timm's ViT-Ti normalises with 0.5, 0.5
    # ImageNet's, as a copy of a Hugging Face folder without its preprocessor_config.json builds it
    other.mean.copy_(torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
    with pytest.raises(AdapterFileError, match=r"trained on images normalised with mean \[0\.5, 0\.5, 0\.5\] and "
                                               r"std \[0\.5, 0\.5, 0\.5\], and this backbone normalises with "
                                               r"mean \[0\.485, 0\.456, 0\.406\] and std"):
        hl.load_adapter(other, tmp_path / "a.safetensors")
    assert hl.load_adapter(other, tmp_path / "a.safetensors", check_fingerprint=False).mean.flatten()[2] < 0.41
