"""PEFT folders in and out, and head pruning of a PEFT adapter: PEFT's own model must give heartlora's logits.

Tolerance: atol 1e-5, rtol 1e-4 on logits of order 1 (float32; the two compute the same products in another
order)."""

from __future__ import annotations

import json
import re

import pytest
import torch

peft = pytest.importorskip("peft")

import heartlora as hl
import heartlora.method
from heartlora.backbones import create_backbone
from heartlora.errors import AdapterFileError, ConfigError, UnsupportedBackboneError
from heartlora.integrations import export_peft, import_peft, score_and_prune
from heartlora.method.model import attach_state

ATOL, RTOL = 1e-5, 1e-4
FAMILIES = {"vit": (32, 8), "dinov2": (28, 7)}  # image size, patch


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def hf_dir(request, tmp_path_factory):
    """A tiny random transformers backbone saved with its weights, as `hf:<dir>` loads it."""
    from transformers import Dinov2Config, Dinov2Model, ViTConfig, ViTModel

    size, patch = FAMILIES[request.param]
    common = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64,
              "image_size": size, "patch_size": patch, "attn_implementation": "eager"}
    torch.manual_seed(0)
    model = ViTModel(ViTConfig(**common)) if request.param == "vit" else Dinov2Model(Dinov2Config(**common))
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    return request.param, path, size


def _hl(path, size, pool="cls", classes=5):
    torch.manual_seed(1)
    return create_backbone(f"hf:{path}", num_classes=classes, img_size=size, pool=pool)


def _hf_classifier(family, path, base_state, classes=5):
    """The transformers image classifier with the backbone's weights (what a PEFT user has)."""
    from transformers import AutoConfig, Dinov2ForImageClassification, ViTForImageClassification

    config = AutoConfig.from_pretrained(path)
    config.num_labels = classes
    cls = ViTForImageClassification if family == "vit" else Dinov2ForImageClassification
    model = cls(config)
    getattr(model, model.base_model_prefix).load_state_dict(base_state, strict=True)
    return model.eval()


def _normalised(model, x):
    return (x - model.mean) / model.std


def _randomise(model, seed=2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in hl.adapter_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        head = model.head
        head.weight.copy_(torch.randn(head.weight.shape, generator=g))
        head.bias.copy_(torch.randn(head.bias.shape, generator=g))


@pytest.mark.parametrize("bits", [32, 2])
def test_export_loads_in_peft_with_equal_logits(hf_dir, tmp_path, bits):
    family, path, size = hf_dir
    model = _hl(path, size)
    base = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    hl.attach(model, hl.HeartLoRAConfig(targets=("q", "k", "v", "o"), rank=4, scale=0.5, bits=bits))
    _randomise(model)
    off = [("backbone.layers.0.attention", 1), ("backbone.layers.1.attention", 0), ("backbone.layers.1.attention", 3)]
    hl.deactivate_heads(model, heads=[(n, h) for n, h in off if n in dict(model.named_modules())] or
                        [(layer.name, h) for layer in hl.attention_layers(model)[:1] for h in (1, 2)])
    report = export_peft(model, tmp_path / "peft")
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 2.0 and cfg["modules_to_save"] == ["classifier"]
    assert report.model_class.endswith("ForImageClassification") and report.heads_on < report.heads_total

    pm = peft.PeftModel.from_pretrained(_hf_classifier(family, path, base), tmp_path / "peft").eval()
    x = torch.rand(3, 3, size, size, generator=torch.Generator().manual_seed(3))
    model.eval()
    with torch.no_grad():
        ours = model(x)
        theirs = pm(pixel_values=_normalised(model, x)).logits
    assert ours.abs().max() > 0.1
    torch.testing.assert_close(theirs, ours, atol=ATOL, rtol=RTOL)


def _peft_adapter(family, path, tmp_path, targets=("q", "k", "v", "o"), r=3, alpha=5, classes=5, **settings):
    """A PEFT LoRA adapter with random (trained-looking) weights on the transformers classifier, saved. ``settings``:
    other LoraConfig fields (or these: target_modules, modules_to_save)."""
    torch.manual_seed(4)
    hl_plain = _hl(path, FAMILIES[family][0])
    base = {k: v.clone() for k, v in hl_plain.backbone.state_dict().items()}
    hf = _hf_classifier(family, path, base, classes)
    names = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj"}
    wanted = [n for n, m in hf.named_modules() if isinstance(m, torch.nn.Linear) and ".attention." in n
              and n.rsplit(".", 1)[-1] in {names[t] for t in targets}]
    settings = {"target_modules": wanted, "modules_to_save": ["classifier"], **settings}
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=r, lora_alpha=alpha, **settings))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    pm.save_pretrained(tmp_path / "trained")
    return pm.eval(), tmp_path / "trained"


def test_import_gives_peft_logits(hf_dir, tmp_path):
    family, path, size = hf_dir
    pm, folder = _peft_adapter(family, path, tmp_path)
    pool = "cls" if family == "vit" else "cls+mean"
    model = import_peft(folder, _hl(path, size, pool)).eval()
    cfg = hl.method.adapter_config(model)
    assert cfg.targets == ("q", "k", "v", "o") and cfg.rank == 3 and cfg.scale == pytest.approx(5 / 3)
    x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        torch.testing.assert_close(model(x), pm(pixel_values=_normalised(model, x)).logits, atol=ATOL, rtol=RTOL)


def test_import_builds_backbone_from_the_folder(hf_dir, tmp_path):
    family, path, size = hf_dir
    pm, folder = _peft_adapter(family, path, tmp_path, targets=("q", "v"))
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(path)
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    model = import_peft(folder, img_size=size).eval()
    assert model.pool == ("cls" if family == "vit" else "cls+mean")  # read from the classifier's width
    x = torch.rand(2, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(model(x), pm(pixel_values=_normalised(model, x)).logits, atol=ATOL, rtol=RTOL)


def test_prune_then_file_equals_peft_with_heads_zeroed(hf_dir, tmp_path):
    family, path, size = hf_dir
    pm, folder = _peft_adapter(family, path, tmp_path)
    pool = "cls" if family == "vit" else "cls+mean"
    model = import_peft(folder, _hl(path, size, pool))
    g = torch.Generator().manual_seed(7)
    batches = [(torch.rand(4, 3, size, size, generator=g), torch.randint(0, 5, (4,), generator=g)) for _ in range(2)]
    result = score_and_prune(model, batches, ne=3)
    assert len(result["heads_off"]) == 3 and all(len(s) == 4 for s in result["scores"].values())
    hl.save_adapter(model, tmp_path / "pruned.safetensors")
    restored = hl.load_adapter(_hl(path, size, pool), tmp_path / "pruned.safetensors").eval()

    prefix = pm.base_model.model.base_model_prefix
    d = 32 // 4
    with torch.no_grad():
        for layer, h in result["heads_off"]:
            for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                lora = pm.base_model.model.get_submodule(f"{prefix}{layer[len('backbone'):]}.{proj}")
                if proj == "o_proj":
                    lora.lora_A["default"].weight[:, h * d:(h + 1) * d] = 0
                else:
                    lora.lora_B["default"].weight[h * d:(h + 1) * d] = 0
    x = torch.rand(2, 3, size, size, generator=g)
    with torch.no_grad():
        theirs = pm(pixel_values=_normalised(restored, x)).logits
        torch.testing.assert_close(restored(x), theirs, atol=ATOL, rtol=RTOL)
        # And the pruning changed something: the unpruned import differs.
        full = import_peft(folder, _hl(path, size, pool)).eval()
        assert not torch.allclose(full(x), theirs, atol=1e-4)


def _imported_and_batches(hf_dir, tmp_path, n=2):
    """A function giving a fresh heartlora model of a PEFT adapter each call, and ``n`` batches of random images."""
    family, path, size = hf_dir
    _, folder = _peft_adapter(family, path, tmp_path)
    pool = "cls" if family == "vit" else "cls+mean"
    g = torch.Generator().manual_seed(7)
    batches = [(torch.rand(4, 3, size, size, generator=g), torch.randint(0, 5, (4,), generator=g)) for _ in range(n)]
    return (lambda: import_peft(folder, _hl(path, size, pool))), batches


def test_random_control_prunes_the_heads_its_seed_draws(hf_dir, tmp_path):
    # mode="random": the heads off are the lowest of a uniform draw from the seed, whatever the batches say (no pass
    # over them), another seed another set; the Taylor ranking of the same adapter is a different set.
    fresh, all_batches = _imported_and_batches(hf_dir, tmp_path, n=3)
    batches, other = all_batches[:2], all_batches[2:]

    def prune(b, **kw):
        return score_and_prune(fresh(), b, ne=3, **kw)

    a, b = prune(batches, mode="random", seed=5), prune(other, mode="random", seed=5)
    c = prune(batches, mode="random", seed=6)
    draw = torch.rand(8, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    layers = list(a["scores"])
    expected = {(layers[int(i) // 4], int(i) % 4) for i in draw.argsort()[:3]}
    assert {tuple(h) for h in a["heads_off"]} == expected == {tuple(h) for h in b["heads_off"]}
    assert {tuple(h) for h in c["heads_off"]} != expected
    taylor = prune(batches)
    assert taylor["scores"] != a["scores"]


def test_prune_auto_tolerance_reaches_the_choice(hf_dir, tmp_path):
    # ne="auto" judges each share against `tolerance` x the loss with every head on: a huge tolerance passes every
    # share (the largest is taken), a negative one is refused; the default never takes more than the huge one.
    fresh, batches = _imported_and_batches(hf_dir, tmp_path)

    def prune(**kw):
        return score_and_prune(fresh(), batches[:1], "auto", heldout=batches[1:], **kw)

    loose, default = prune(tolerance=1e9), prune()
    assert loose["ne"] == max(c["ne"] for c in loose["ne_choice"]["candidates"]) > 0
    assert default["ne"] <= loose["ne"] and "0.02" in default["ne_choice"]["rule"]
    with pytest.raises(ConfigError, match="tolerance -0.1 must be a number >= 0"):
        prune(tolerance=-0.1)


def test_export_import_round_trip_keeps_heads_off(hf_dir, tmp_path):
    _, path, size = hf_dir
    model = _hl(path, size)
    hl.attach(model, hl.HeartLoRAConfig(targets=("q", "v"), rank=2))
    _randomise(model)
    layer = hl.attention_layers(model)[0].name
    hl.deactivate_heads(model, heads=[(layer, 0), (layer, 2)])
    export_peft(model, tmp_path / "peft")
    back = import_peft(tmp_path / "peft").eval()  # the backbone named in the folder's metadata
    assert hl.head_masks(back) == hl.head_masks(model)
    x = torch.rand(2, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(back(x), model.eval()(x), atol=ATOL, rtol=RTOL)


def test_import_refuses_lora_outside_attention(hf_dir, tmp_path):
    family, path, size = hf_dir
    from safetensors.torch import load_file, save_file

    pm, folder = _peft_adapter(family, path, tmp_path, targets=("q",))
    tensors = load_file(folder / "adapter_model.safetensors")
    hf = pm.base_model.model
    mlp = next(n for n, m in hf.named_modules() if isinstance(m, torch.nn.Linear) and ".attention." not in n
               and n.startswith(hf.base_model_prefix + ".") and m.in_features == 32)
    tensors[f"base_model.model.{mlp}.lora_A.weight"] = torch.zeros(3, 32)
    tensors[f"base_model.model.{mlp}.lora_B.weight"] = torch.zeros(hf.get_submodule(mlp).out_features, 3)
    save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    pool = "cls" if family == "vit" else "cls+mean"
    with pytest.raises(ConfigError, match="not an attention projection"):
        import_peft(folder, _hl(path, size, pool))


def test_export_refuses_timm_fused_qkv(tmp_path):
    model = create_backbone("vit_tiny_patch16_224", num_classes=3, img_size=32, pretrained=False)
    hl.attach(model, hl.HeartLoRAConfig(rank=2))
    with pytest.raises(UnsupportedBackboneError, match="Hugging Face ViT / DINOv2"):
        export_peft(model, tmp_path / "x")


def test_export_of_a_transformers_model_attached_directly_says_what_to_do(tmp_path):
    from transformers import ViTConfig, ViTForImageClassification

    model = ViTForImageClassification(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                                intermediate_size=64, image_size=32, patch_size=8, num_labels=3))
    hl.attach(model, hl.HeartLoRAConfig(rank=2))
    with pytest.raises(UnsupportedBackboneError, match="attached directly.*create_backbone"):
        export_peft(model, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_cli_export_and_prune(hf_dir, tmp_path, capsys, monkeypatch):
    from heartlora.cli.main import main

    family, path, size = hf_dir
    model = _hl(path, size)
    hl.attach(model, hl.HeartLoRAConfig(targets=("q", "v"), rank=2))
    _randomise(model)
    hl.save_adapter(model, tmp_path / "a.safetensors")
    assert main(["export", str(tmp_path / "a.safetensors"), str(tmp_path / "exported"), "--format", "peft"]) == 0
    assert "PeftModel.from_pretrained" in capsys.readouterr().out
    before = {f.name: f.read_bytes() for f in (tmp_path / "exported").iterdir()}
    assert main(["export", str(tmp_path / "a.safetensors"), str(tmp_path / "exported")]) == 2  # nothing replaced
    assert "already holds adapter_config.json, adapter_model.safetensors" in capsys.readouterr().err
    assert {f.name: f.read_bytes() for f in (tmp_path / "exported").iterdir()} == before
    assert main(["export", "--adapter", str(tmp_path / "a.safetensors"), str(tmp_path / "exported"),
                 "--overwrite"]) == 0
    capsys.readouterr()
    back = import_peft(tmp_path / "exported").eval()
    x = torch.rand(2, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(back(x), model.eval()(x), atol=ATOL, rtol=RTOL)

    _, folder = _peft_adapter(family, path, tmp_path, classes=10)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(path)
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    out = tmp_path / "pruned.safetensors"
    assert main(["prune", str(folder), "--task", "digits", "--ne", "2", "--batches", "1", "--batch-size", "8",
                 "--img-size", str(size), "--out", str(out), "--peft-out", str(tmp_path / "again"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ne"] == 2 and len(report["heads_off"]) == 2 and report["images"] == 200
    assert report["adapter_bytes"] < report["peft_lora_bytes"]
    info = hl.read_adapter_info(out)
    assert sum(not on for layer in info["layers"] for on in layer["head_mask"]) == 2
    assert info["extra"]["heartlora_run"]["task"] == "digits"
    assert hl.head_masks(import_peft(tmp_path / "again")) == {layer["name"]: layer["head_mask"]
                                                              for layer in info["layers"]}
    assert main(["prune", str(folder), "--task", "digits", "--ne", "2", "--batches", "1", "--img-size", str(size),
                 "--score-mode", "random", "--score-seed", "3", "--out", str(tmp_path / "random.safetensors"),
                 "--json"]) == 0
    control = json.loads(capsys.readouterr().out)
    assert control["score_mode"] == "random" and control["scoring_images"] == 0
    draw = torch.rand(8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)  # 2 layers x 4 heads
    saved = hl.read_adapter_info(tmp_path / "random.safetensors")["layers"]
    off = {(layer["name"], h) for layer in saved for h, on in enumerate(layer["head_mask"]) if not on}
    assert off == {(saved[int(i) // 4]["name"], int(i) % 4) for i in draw.argsort()[:2]}  # --score-seed 3's draw
    assert off == {tuple(h) for h in control["heads_off"]} and control["score_seed"] == 3 and control["seed"] == 0
    assert main(["prune", str(folder), "--task", "digits", "--ne", "2", "--batches", "1", "--img-size", str(size),
                 "--score-mode", "random", "--seed", "3", "--out", str(tmp_path / "random3.safetensors"),
                 "--json"]) == 0  # --score-seed defaults to --seed
    assert {tuple(h) for h in json.loads(capsys.readouterr().out)["heads_off"]} == off
    assert hl.read_adapter_info(tmp_path / "random3.safetensors")["extra"]["heartlora_run"]["init_seed"] == 3
    assert main(["prune", str(folder), "--task", "digits", "--ne", "auto", "--ne-tolerance", "1e9", "--batches", "1",
                 "--img-size", str(size), "--out", str(tmp_path / "loose.safetensors"), "--json"]) == 0
    loose = json.loads(capsys.readouterr().out)  # every share passes: the largest candidate is taken
    assert loose["ne"] == max(c["ne"] for c in loose["ne_choice"]["candidates"]) > 0
    assert main(["prune", str(folder), "--task", "digits", "--ne", "many"]) == 2
    assert "error: --ne 'many' is neither a number of attention heads nor auto" in capsys.readouterr().err
    assert main(["prune", str(folder), "--task", "digits", "--ne", "2", "--ne-tolerance", "0.1"]) == 2
    assert "error: --ne-tolerance applies to --ne auto only" in capsys.readouterr().err  # the CLI names its flags

    # An existing output is refused before any scoring; the count says which heads the PEFT folder had off already.
    kept = out.read_bytes()
    again = ["prune", str(tmp_path / "again"), "--task", "digits", "--ne", "1", "--batches", "1", "--batch-size", "8",
             "--img-size", str(size), "--out", str(out), "--backbone", str(path)]
    assert main(again) == 2
    assert "already exists" in capsys.readouterr().err and out.read_bytes() == kept
    assert main([*again, "--overwrite", "--json"]) == 0
    second = json.loads(capsys.readouterr().out)
    total = report["heads_total"]
    assert (len(second["heads_off"]), second["heads_on_before"], second["heads_on"]) == (1, total - 2, total - 3)
    monkeypatch.setenv("COLUMNS", "250")  # the table in one line per row
    assert main([*again, "--overwrite"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert f"1 of {total}; with the 2 off in the PEFT folder (all-zero rows), 3 off, {total - 3} on" in text
    assert sum(not on for layer in hl.read_adapter_info(out)["layers"] for on in layer["head_mask"]) == 3


def _pool(family):
    return "cls" if family == "vit" else "cls+mean"


# where each family's transformer blocks are (transformers 5), and the name PEFT's layers_pattern matches
BLOCKS = {"vit": ("layers", "layers"), "dinov2": ("encoder.layer", "layer")}


def _attention(family, i, proj):
    return f"{family}.{BLOCKS[family][0]}.{i}.attention.{proj}"


def _edit(folder, tensors=None, config=None):
    """Rewrite a PEFT folder: ``tensors(dict)`` edits the weights in place, ``config(dict)`` the JSON config."""
    from safetensors.torch import load_file, save_file

    if tensors:
        t = load_file(folder / "adapter_model.safetensors")
        tensors(t)
        save_file(t, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    if config:
        doc = json.loads((folder / "adapter_config.json").read_text())
        config(doc)
        (folder / "adapter_config.json").write_text(json.dumps(doc))


@pytest.mark.parametrize("case", ["rslora+rank_pattern", "layers_to_transform", "dropout", "regex",
                                  "target_parameters", "gaussian", "exclude_modules"])
def test_import_converts_the_lora_settings_it_represents(hf_dir, tmp_path, case):
    # The allowlist of LoraConfig fields keeps these: each gives PEFT's logits.
    family, path, size = hf_dir
    settings = {"rslora+rank_pattern": {"use_rslora": True, "rank_pattern": {_attention(family, 0, "q_proj"): 2,
                                                                             _attention(family, 1, "v_proj"): 5}},
                "layers_to_transform": {"layers_to_transform": [1], "layers_pattern": BLOCKS[family][1],
                                        "target_modules": ["q_proj", "v_proj"]},
                "dropout": {"lora_dropout": 0.3},
                "regex": {"target_modules": r".*attention\.(q_proj|v_proj)"},
                "target_parameters": {"target_modules": ["q_proj"],
                                      "target_parameters": [_attention(family, 1, "v_proj") + ".weight"]},
                "gaussian": {"init_lora_weights": "gaussian"},
                "exclude_modules": {"target_modules": ["q_proj", "v_proj"],
                                    "exclude_modules": [_attention(family, 0, "v_proj")]}}[case]
    pm, folder = _peft_adapter(family, path, tmp_path, **settings)
    model = import_peft(folder, _hl(path, size, _pool(family))).eval()
    x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        torch.testing.assert_close(model(x), pm(pixel_values=_normalised(model, x)).logits, atol=ATOL, rtol=RTOL)


def test_import_loads_the_other_saved_modules_and_refuses_what_it_cannot_hold(hf_dir, tmp_path):
    # Defect: every saved module but the classifier was dropped (the base model's layernorm kept): other logits.
    family, path, size = hf_dir
    pm, folder = _peft_adapter(family, path, tmp_path, modules_to_save=["classifier", "layernorm"])
    model = import_peft(folder, _hl(path, size, _pool(family))).eval()
    assert attach_state(model).modules_to_save == ("head", "backbone.layernorm")
    x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        torch.testing.assert_close(model(x), pm(pixel_values=_normalised(model, x)).logits, atol=ATOL, rtol=RTOL)
    hl.save_adapter(model, tmp_path / "a.safetensors")  # and heartlora's own file keeps it
    again = hl.load_adapter(_hl(path, size, _pool(family)), tmp_path / "a.safetensors").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x), atol=1e-6, rtol=0)
    # a module saved in part, one this backbone lacks, one holding an adapted projection: refused in one line
    _edit(folder, tensors=lambda t: t.pop(f"base_model.model.{family}.layernorm.bias"))
    with pytest.raises(AdapterFileError, match=r"it saves layernorm without its bias; the folder is damaged"):
        import_peft(folder, _hl(path, size, _pool(family)))
    _edit(folder, tensors=lambda t: t.update({f"base_model.model.{family}.nowhere.weight": torch.ones(3)}))
    with pytest.raises(ConfigError, match=rf"it saves base_model\.model\.{family}\.nowhere\.weight, which this "
                                          "backbone does not have"):
        import_peft(folder, _hl(path, size, _pool(family)))
    _, plain = _peft_adapter(family, path, tmp_path / "plain")
    q = _attention(family, 0, "q_proj")
    _edit(plain, tensors=lambda t: t.update({f"base_model.model.{q}.weight": torch.zeros(32, 32)}))
    with pytest.raises(ConfigError, match=rf"it saves {q} whole, and heartlora adapts"):
        import_peft(plain, _hl(path, size, _pool(family)))
    # PEFT's SEQ_CLS model adds "score" beside "classifier" by itself; nothing is saved for it in an image classifier
    _, plain = _peft_adapter(family, path, tmp_path / "seq")
    _edit(plain, config=lambda c: c.update(modules_to_save=["classifier", "score"], task_type="SEQ_CLS"))
    import_peft(plain, _hl(path, size, _pool(family)))


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora", "corda", "lora_ga", "loftq", "mica"])
def test_import_refuses_inits_that_are_not_plain_lora(hf_dir, tmp_path, init):
    # Defect: PiSSA, OLoRA, CorDA rewrite the base weights in PEFT; heartlora added the LoRA to the original ones.
    family, path, size = hf_dir
    _, folder = _peft_adapter(family, path, tmp_path)
    loftq = {"loftq_config": {"loftq_bits": 4, "loftq_iter": 1}} if init == "loftq" else {}
    _edit(folder, config=lambda c: c.update(init_lora_weights=init, **loftq))
    what = "path_initial_model_for_weight_conversion" if init in ("pissa", "pissa_niter_4", "olora", "corda",
                                                                  "lora_ga") else "init_lora_weights=True"
    with pytest.raises(ConfigError, match=f"init_lora_weights='{init}'.*{what}"):
        import_peft(folder, _hl(path, size, _pool(family)))


def test_import_refuses_a_real_pissa_adapter_whose_logits_it_would_miss(hf_dir, tmp_path):
    family, path, size = hf_dir
    _, folder = _peft_adapter(family, path, tmp_path, targets=("q", "v"), init_lora_weights="pissa")
    with pytest.raises(ConfigError, match="init_lora_weights='pissa' makes PEFT rewrite the base weights"):
        import_peft(folder, _hl(path, size, _pool(family)))


@pytest.mark.parametrize(("field", "value"), [("layer_replication", [[0, 1], [0, 1]]),
                                              ("trainable_token_indices", [0, 1]), ("use_qalora", True),
                                              ("ensure_weight_tying", True), ("from_a_newer_peft", {"x": 1})])
def test_import_refuses_settings_it_does_not_convert(hf_dir, tmp_path, field, value):
    family, path, size = hf_dir
    _, folder = _peft_adapter(family, path, tmp_path)
    _edit(folder, config=lambda c: c.update({field: value}))
    with pytest.raises(ConfigError, match=f"it sets {field}="):
        import_peft(folder, _hl(path, size, _pool(family)))


def test_import_never_downloads_the_base_model_a_folder_names(hf_dir, tmp_path, monkeypatch):
    import heartlora.backbones

    family, path, size = hf_dir
    pm, folder = _peft_adapter(family, path, tmp_path)
    _edit(folder, config=lambda c: c.update(base_model_name_or_path="some-user/some-vit"))
    real = heartlora.backbones.create_hf

    def offline(*args, **kwargs):
        raise AssertionError("heartlora tried to build a hub backbone a PEFT folder named")
    monkeypatch.setattr(heartlora.backbones, "create_hf", offline)
    with pytest.raises(UnsupportedBackboneError, match="'hf:some-user/some-vit', which would be downloaded.*--backb"):
        import_peft(folder, img_size=size)
    monkeypatch.setattr(heartlora.backbones, "create_hf", real)
    model = import_peft(folder, backbone=f"hf:{path}", img_size=size).eval()  # the user's choice is built
    x = torch.rand(2, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(model(x), pm(pixel_values=_normalised(model, x)).logits, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("damage", ["bias (1,)", "bias missing", "q_proj (3,1) (1,3)", "B transposed",
                                    "classifier weight 1-d"])
def test_import_refuses_tensors_of_the_wrong_shape(hf_dir, tmp_path, damage):
    # Defect: shapes were only checked against each other, so a (1,) bias or (3, 1) @ (1, 3) factors broadcast, and
    # a missing bias left the head's random one.
    from heartlora.errors import AdapterFileError

    family, path, size = hf_dir
    _, folder = _peft_adapter(family, path, tmp_path)
    q = f"base_model.model.{_attention(family, 0, 'q_proj')}.lora_"
    bias = "base_model.model.classifier.bias"
    edit, message = {
        "bias (1,)": (lambda t: t.update({bias: t[bias][:1].clone()}), rf"{bias} has shape \(1,\).*expected \(5,\)"),
        "bias missing": (lambda t: t.pop(bias), rf"{bias} is missing, expected shape \(5,\)"),
        "q_proj (3,1) (1,3)": (lambda t: t.update({q + "A.weight": t[q + "A.weight"][:, :1].clone(),
                                                   q + "B.weight": t[q + "B.weight"][:1].clone()}),
                               rf"{q}A.weight has shape \(3, 1\), expected \(3, 32\)"),
        "B transposed": (lambda t: t.update({q + "B.weight": torch.zeros(3, 32)}),
                         rf"{q}B.weight has shape \(3, 32\), expected \(32, 3\)"),
        "classifier weight 1-d": (lambda t: t.update({"base_model.model.classifier.weight": torch.zeros(5)}),
                                  r"classifier.weight has shape \(5,\)"),
    }[damage]
    _edit(folder, tensors=edit)
    with pytest.raises(AdapterFileError, match=message):
        import_peft(folder, _hl(path, size, _pool(family)))


def test_import_names_a_conv_target_as_outside_attention(hf_dir, tmp_path):
    family, path, size = hf_dir
    _, folder = _peft_adapter(family, path, tmp_path, target_modules=["q_proj", "projection"])
    with pytest.raises(ConfigError, match="patch_embeddings.projection, which is not an attention projection"):
        import_peft(folder, _hl(path, size, _pool(family)))


def test_export_writes_every_saved_module_for_peft(hf_dir, tmp_path):
    # Defect: only the head was written (as "classifier"); a saved layernorm was dropped, PEFT gave other logits.
    family, path, size = hf_dir
    model = _hl(path, size, _pool(family))
    base = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    hl.attach(model, hl.HeartLoRAConfig(targets=("q", "v"), rank=4, modules_to_save=("head", "backbone.layernorm")))
    _randomise(model)
    g = torch.Generator().manual_seed(8)
    with torch.no_grad():
        for p in model.backbone.layernorm.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    hl.save_adapter(model, tmp_path / "a.safetensors")
    export_peft(tmp_path / "a.safetensors", tmp_path / "peft")  # from the file, as `heartlora export` does
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["modules_to_save"] == ["classifier", f"{family}.layernorm"]
    pm = peft.PeftModel.from_pretrained(_hf_classifier(family, path, base), tmp_path / "peft").eval()
    x = torch.rand(3, 3, size, size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(pm(pixel_values=_normalised(model, x)).logits, model.eval()(x), atol=ATOL,
                                   rtol=RTOL)
        back = import_peft(tmp_path / "peft", _hl(path, size, _pool(family))).eval()  # and back: a round trip
        torch.testing.assert_close(back(x), model(x), atol=ATOL, rtol=RTOL)
    assert attach_state(back).modules_to_save == ("head", "backbone.layernorm")

    # A saved module holding LoRA layers has no exact PEFT form: refused, nothing written.
    held = _hl(path, size, _pool(family))
    layer = "backbone." + _attention(family, 0, "q_proj").split(".", 1)[1].rsplit(".", 1)[0]
    hl.attach(held, hl.HeartLoRAConfig(targets=("q", "v"), rank=2, modules_to_save=("head", layer)))
    with pytest.raises(UnsupportedBackboneError, match=f"modules_to_save '{layer}'.*holds the LoRA of {layer}"):
        export_peft(held, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()


def test_export_replaces_links_and_writes_the_pair_together(hf_dir, tmp_path, monkeypatch):
    # Defect: adapter_config.json was opened with "w", so a link there had its target overwritten, and it was
    # written after the weights had been replaced.
    family, path, size = hf_dir

    def adapted(scale, seed):
        model = _hl(path, size)
        hl.attach(model, hl.HeartLoRAConfig(targets=("q", "v"), rank=4, scale=scale))
        _randomise(model, seed)
        return model

    export_peft(adapted(4.0, 2), tmp_path / "a")
    kept = {f.name: f.read_bytes() for f in (tmp_path / "a").iterdir()}
    (tmp_path / "b").mkdir()
    for name in kept:
        (tmp_path / "b" / name).symlink_to(tmp_path / "a" / name)
    export_peft(adapted(0.5, 3), tmp_path / "b")
    assert {f.name: f.read_bytes() for f in (tmp_path / "a").iterdir()} == kept  # the links' targets are untouched
    assert not any(f.is_symlink() for f in (tmp_path / "b").iterdir())
    assert json.loads((tmp_path / "b" / "adapter_config.json").read_text())["lora_alpha"] == 2.0
    assert peft.PeftConfig.from_pretrained(tmp_path / "b").lora_alpha == 2.0

    # A failure while writing the config leaves both old files (not new weights beside an old config).
    def fail(self):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(peft.LoraConfig, "to_dict", fail)
    with pytest.raises(OSError):
        export_peft(adapted(1.0, 4), tmp_path / "a")
    assert sorted(f.name for f in (tmp_path / "a").iterdir()) == sorted(kept)  # no temporary file left
    assert {f.name: f.read_bytes() for f in (tmp_path / "a").iterdir()} == kept


def test_a_config_from_a_newer_peft_says_to_upgrade(hf_dir, tmp_path, monkeypatch):
    """The oldest supported peft's LoraConfig refuses keys a newer PEFT writes (TypeError): the advice is to upgrade,
    not to save the adapter again."""
    family, path, size = hf_dir
    _, folder = _peft_adapter(family, path, tmp_path)

    def older(*args, **kwargs):
        raise TypeError("LoraConfig.__init__() got an unexpected keyword argument 'alora_invocation_tokens'")

    monkeypatch.setattr(peft.PeftConfig, "from_pretrained", older)
    with pytest.raises(AdapterFileError, match=rf"alora_invocation_tokens'\): a newer PEFT wrote it: upgrade peft "
                                               rf"\(installed {re.escape(peft.__version__)}\)$"):
        import_peft(folder, _hl(path, size, _pool(family)))
