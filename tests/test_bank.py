"""AdapterBank: a mixed-task batch on one backbone equals each task's own loaded model, row by row."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES

import heartlora as hl
from heartlora.errors import AdapterFileError, ConfigError

# float32 on the CPU; the bank adds the same products as the task's own model, but on a slice of the batch and with
# each projection's delta added on its own (the own model may fuse them into one product): some float32 ulps of the
# logits' scale. How many depends on the CPU's matrix kernels (an AMD EPYC gave 1.1e-5 on a logit of 5.5, 2e-6
# relative), so the tolerance is relative as well; a task's factors applied to the wrong rows differ by far more.
ATOL = 1e-5
RTOL = 1e-5


def _vit(num_classes: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return hl.create_backbone("vit_tiny_patch16_224", num_classes=num_classes, img_size=32, pretrained=False)


def _family(name: str):
    def build(num_classes: int) -> torch.nn.Module:
        torch.manual_seed(0)
        return FAMILIES[name][0]()
    return build


def _make_adapter(tmp_path, build, task: str, num_classes: int, bits: int, rank: int, off: int, seed: int):
    """A trained-looking adapter: random nonzero factors and classifier, ``off`` heads switched off."""
    # scale 1: the factors below are already of a trained size, and ATOL was measured on logits of this scale
    model = hl.attach(build(num_classes), hl.HeartLoRAConfig(targets=("q", "k", "v", "o"), rank=rank, bits=bits,
                                                             scale=1.0), verify=False)
    g = torch.Generator().manual_seed(seed)
    layers = hl.attention_layers(model)
    heads = [(layer.name, h) for layer in layers for h in range(layer.num_heads)]
    pick = torch.randperm(len(heads), generator=g)[:off].tolist()
    hl.deactivate_heads(model, heads=[heads[i] for i in pick])
    with torch.no_grad():
        for p in hl.adapter_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        for p in model.get_classifier().parameters() if hasattr(model, "get_classifier") else model.head.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    path = tmp_path / f"{task}.safetensors"
    names = [f"{task}-{i}" for i in range(num_classes)]
    hl.save_adapter(model, path, extra_metadata={"heartlora_run": {"task": task, "class_names": names,
                                                                       "pretrained": False, "init_seed": 0}})
    return path


def _own_logits(build, path, num_classes: int, x: torch.Tensor) -> torch.Tensor:
    model = hl.load_adapter(build(num_classes), path).eval()
    with torch.no_grad():
        return model(x)


CASES = {  # task -> (classes, bits, rank, heads off)
    "a": (5, 32, 4, 0),
    "b": (3, 1, 2, 9),
    "c": (7, 32, 8, 20),
    "d": (4, 2, 4, 5),
}


@pytest.mark.parametrize("gather_from", [1, 99], ids=["batched", "per-group"])
@pytest.mark.parametrize("family", ["vit", "hf_dinov2", "timm_swin"])
def test_mixed_batch_equals_each_tasks_own_model(tmp_path, family, gather_from, monkeypatch):
    """Both ways of adding the deltas (per task group from views of its factors; gathered per image and batched)
    give each row its own task's logits, whatever the ranks, bits and heads off of the tasks beside it."""
    from heartlora.bank import BankLinear

    monkeypatch.setattr(BankLinear, "GATHER_FROM", gather_from)
    build = _vit if family == "vit" else _family(family)
    fixed = family != "vit"  # the conftest models have a 5-way classifier
    paths = {}
    for i, (task, (classes, bits, rank, off)) in enumerate(CASES.items()):
        classes = 5 if fixed else classes
        if family == "timm_swin":
            off = min(off, 3)
        paths[task] = _make_adapter(tmp_path, build, task, classes, bits, rank, off, seed=i)
    bank = hl.AdapterBank(build(10))
    for task in CASES:
        added = bank.add(paths[task])
        assert added.name == task and added.class_names[0] == f"{task}-0"
    x = torch.rand(9, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    tasks = ["c", "a", "b", "a", "d", "c", "b", "b", "a"]
    got = bank(x, tasks)
    for task in CASES:
        rows = [i for i, t in enumerate(tasks) if t == task]
        want = _own_logits(build, paths[task], 5 if fixed else CASES[task][0], x[rows])
        for j, i in enumerate(rows):
            assert got[i].shape == want[j].shape
            torch.testing.assert_close(got[i], want[j], atol=ATOL, rtol=RTOL)
    # Rows of one task alone give the same answers as inside the mixed batch.
    alone = bank(x[[1, 3]], ["a", "a"])
    torch.testing.assert_close(torch.stack(alone), torch.stack([got[1], got[3]]), atol=ATOL, rtol=RTOL)


def test_batched_path_runs_a_fixed_number_of_operators_whatever_the_number_of_tasks(tmp_path, monkeypatch):
    """The adapted Linears' delta work on the batched path is the same operators for 2 task groups as for 4, while
    the per-group loop's grows with the groups (counted at the ATen level: deterministic, not a timing)."""
    from collections import Counter

    from torch.utils._python_dispatch import TorchDispatchMode

    from heartlora.bank import BankLinear

    class CountOps(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += 1
            return func(*args, **(kwargs or {}))

    counts: Counter[str] = Counter()
    plain_forward = BankLinear.forward

    def counted(self, x):
        with CountOps() as c:
            out = plain_forward(self, x)
        counts[self.GATHER_FROM] += c.n
        return out

    monkeypatch.setattr(BankLinear, "forward", counted)
    bank = hl.AdapterBank(_vit(10))
    for i, (task, (classes, bits, rank, off)) in enumerate(CASES.items()):
        bank.add(_make_adapter(tmp_path, _vit, task, classes, bits, rank, off, seed=i))
    x = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    ops = {}
    for gather_from in (1, 99):
        monkeypatch.setattr(BankLinear, "GATHER_FROM", gather_from)
        for tasks in (["a", "b"] * 4, ["a", "b", "c", "d"] * 2):
            counts.clear()
            bank(x, tasks)
            ops[gather_from, len(set(tasks))] = counts[gather_from]
    assert ops[1, 2] == ops[1, 4] > 0
    assert ops[99, 4] > ops[99, 2]


@pytest.mark.parametrize("gather_from", [1, 99], ids=["batched", "per-group"])
def test_task_names_with_dots_or_module_attribute_names_work(tmp_path, gather_from, monkeypatch):
    """A name from a dotted file stem ("c.v1") or one that is a Module attribute ("train") is a task like any other:
    the classifier copies are not keyed by name."""
    from heartlora.bank import BankLinear

    monkeypatch.setattr(BankLinear, "GATHER_FROM", gather_from)
    bank = hl.AdapterBank(_vit(10))
    paths = {}
    for i, (name, classes) in enumerate((("c.v1", 3), ("train", 4))):
        paths[name] = _make_adapter(tmp_path, _vit, f"t{i}", classes, 32, 4, 5, seed=i)
        bank.add(paths[name], name=name)
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    tasks = ["train", "c.v1", "c.v1", "train"]
    got = bank(x, tasks)
    for name, classes in (("c.v1", 3), ("train", 4)):
        rows = [i for i, t in enumerate(tasks) if t == name]
        want = _own_logits(_vit, paths[name], classes, x[rows])
        torch.testing.assert_close(torch.stack([got[i] for i in rows]), want, atol=ATOL, rtol=RTOL)


def test_a_refused_add_leaves_the_bank_as_it_was(tmp_path, monkeypatch):
    """An error while a task's deltas are being stored undoes the whole add: no slot, table row or classifier copy
    is left, and every other task's rows (on both paths: the batched one reads slots by number) are unchanged."""
    from heartlora.bank import BankLinear, BankModule

    bank = hl.AdapterBank(_vit(10))
    paths = [_make_adapter(tmp_path, _vit, t, 4, 32, 4, 3, seed=i) for i, t in enumerate("xy")]
    bank.add(paths[0])
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))

    def outputs() -> dict[int, torch.Tensor]:
        out = {}
        for g in (1, 99):
            monkeypatch.setattr(BankLinear, "GATHER_FROM", g)
            out[g] = torch.stack(bank(x, ["x"] * 4))
        return out

    before, resident = outputs(), bank.resident_bytes()

    def broken(self, task, module):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(BankModule, "add", broken)  # fails after every Linear has stored the task's deltas
    with pytest.raises(RuntimeError, match="out of memory"):
        bank.add(paths[1])
    monkeypatch.undo()
    assert list(bank.tasks) == ["x"] and bank.resident_bytes() == resident
    assert all(list(lin._slots) == ["x"] and len(lin._plans) == 1 for lin in bank._linears.values())
    after = outputs()
    assert all(torch.equal(after[g], before[g]) for g in before)
    bank.add(paths[1])  # and the bank still takes it afterwards
    torch.testing.assert_close(torch.stack(bank(x[:2], ["y", "y"])), _own_logits(_vit, paths[1], 4, x[:2]),
                               atol=ATOL, rtol=RTOL)


def test_backbone_is_shared_and_left_plain(tmp_path):
    paths = [_make_adapter(tmp_path, _vit, t, 4, 32, 4, 3, seed=i) for i, t in enumerate("xyz")]
    backbone = _vit(10)
    base_weights = {id(p) for p in backbone.parameters()}
    own_head = backbone.head
    head = own_head.weight.detach().clone()
    bank = hl.AdapterBank(backbone)
    before = bank.resident_bytes()
    for p in paths:
        bank.add(p)
    # One copy of the backbone: every original tensor is still the one in use, none was cloned.
    assert base_weights <= {id(p) for p in bank.model.parameters()}
    assert bank.backbone_bytes() == before
    extra = sum(t.resident_bytes for t in bank.tasks.values())
    assert 0 < bank.routing_bytes() < extra / 10  # index tables and zero rows: small beside the factors
    assert bank.resident_bytes() == before + extra + bank.routing_bytes()
    assert torch.equal(own_head.weight, head)  # the backbone's own classifier is untouched
    assert not any(p.requires_grad for p in bank.model.parameters())


def test_a_task_holds_its_active_factors_indices_and_classifier_and_nothing_else(tmp_path):
    """What the bank keeps per task is what its outputs need: the active heads' factors as used (k-bit decoded, one
    float32 copy), the row/column indices of partial projections (none for q, k, v rows of consecutive heads), its
    classifier. No loaded projection object (with its head bookkeeping and kept copies of decoded values) stays
    behind."""
    from heartlora.method.layer import HeadLoRAProjection

    bank = hl.AdapterBank(_vit(10))
    for i, (task, (classes, bits, rank, off)) in enumerate(CASES.items()):
        path = _make_adapter(tmp_path, _vit, task, classes, bits, rank, off, seed=i)
        bank.add(path)
        own = hl.load_adapter(_vit(classes), path)
        want = sum(t.numel() * t.element_size() for t in own.head.parameters())
        for layer in hl.attention_layers(own):
            for proj in layer.projections.values():
                if not proj.active_heads():
                    continue
                want += 4 * (proj.lora_A.numel() + proj.lora_B.numel())
                rows, flat = proj._rows, proj.index.reshape(-1)
                consecutive = torch.equal(rows, torch.arange(int(rows[0]), int(rows[0]) + rows.numel()))
                by_heads = torch.equal(flat, torch.arange(int(flat[0]), int(flat[0]) + flat.numel()))
                if proj._covers_all or (proj.per_head_is_B and consecutive):  # a slice needs no index
                    continue
                if proj.per_head_is_B and by_heads:  # heads laid out one after another: an index of heads
                    want += 8 * len(proj.active_heads())
                else:
                    want += rows.numel() * rows.element_size()
        assert bank.tasks[task].resident_bytes == want, task
    # the same count written out for task a (every head on, float, rank 4): q, k, v, o in 12 layers, A 4×192 and
    # B 192×4 each, no index; the classifier 192×5 + 5; all float32
    assert bank.tasks["a"].resident_bytes == 4 * (12 * 4 * (4 * 192 + 192 * 4) + 192 * 5 + 5) == 298_772
    assert not any(isinstance(m, HeadLoRAProjection) for m in bank.model.modules())


def test_a_loaded_float_adapter_keeps_no_copy_of_its_factors_and_a_kbit_one_does(tmp_path):
    for bits in (32, 1):
        path = _make_adapter(tmp_path, _vit, f"t{bits}", 3, bits, 4, 2, seed=bits)
        model = hl.load_adapter(_vit(3), path)
        projs = [p for layer in hl.attention_layers(model) for p in layer.projections.values() if p.active_heads()]
        kept = [p._decoded_values is not None for p in projs]
        assert kept and all(kept) == (bits != 32) and any(kept) == (bits != 32)


def test_refusals(tmp_path):
    path = _make_adapter(tmp_path, _vit, "a", 4, 32, 4, 0, seed=0)
    bank = hl.AdapterBank(_vit(4))
    with pytest.raises(ConfigError, match="holds no adapters"):
        bank(torch.rand(1, 3, 32, 32), ["a"])
    bank.add(path)
    with pytest.raises(ConfigError, match="already holds a task named 'a'"):
        bank.add(path)
    with pytest.raises(ConfigError, match="unknown task 'zz'"):
        bank(torch.rand(2, 3, 32, 32), ["a", "zz"])
    with pytest.raises(ConfigError, match="one task per row"):
        bank(torch.rand(2, 3, 32, 32), ["a"])
    torch.manual_seed(1)  # other random weights: another backbone
    other = hl.AdapterBank(hl.create_backbone("vit_tiny_patch16_224", num_classes=4, img_size=32, pretrained=False))
    with pytest.raises(AdapterFileError, match=r"other weights or shapes.*random weights: .*torch.manual_seed\(0\)"):
        other.add(path)
    assert not other.tasks and not other._linears  # a refused file leaves the bank as it was
    with pytest.raises(ConfigError, match="3 class names"):
        bank.add(path, name="b", class_names=["p", "q", "r"])
    x = torch.rand(3, 3, 32, 32)
    assert all(torch.equal(a, b) for a, b in zip(bank(x, "a"), bank(x, ["a"] * 3)))  # one name for every row
    with pytest.raises(ConfigError, match=r"float tensor .* got torch.uint8 .* x.float\(\) / 255"):
        bank((x * 255).to(torch.uint8), "a")  # gave NaN logits
    with pytest.raises(ConfigError, match=r"float tensor \(batch, 3, height, width\)"):
        bank(x[0], "a")


def test_a_vtab_task_is_named_by_its_folder_and_a_run_folder_can_be_added(tmp_path):
    model = hl.attach(_vit(4), hl.HeartLoRAConfig(rank=2), verify=False)
    run = tmp_path / "run"
    for task, want in [("vtab:/data/my tasks/cifar@8shot", "cifar@8shot"), ("vtab:/data/a@b/pets", "pets")]:
        run.mkdir(exist_ok=True)
        hl.save_adapter(model, run / "adapter.safetensors", extra_metadata={"heartlora_run": {"task": task}})
        bank = hl.AdapterBank(_vit(4))
        assert bank.add(run).name == want and list(bank.tasks) == [want]


def test_cli_predict_with_several_adapters_labels_each_image_by_every_task(tmp_path, capsys):
    import json

    import numpy as np
    from PIL import Image

    from heartlora.cli.main import main

    paths = [_make_adapter(tmp_path, _vit, t, n, b, 4, 4, seed=i) for i, (t, n, b) in
             enumerate([("a", 5, 32), ("b", 3, 1)])]
    images = []
    for i in range(2):
        images.append(tmp_path / f"im{i}.png")
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(images[i])
    assert main(["predict", "--adapter", str(paths[0]), "--adapter", str(paths[1]), "--json", "--top-k", "3",
                 *map(str, images)]) == 0
    got = json.loads(capsys.readouterr().out)
    assert [(r["image"], r["task"]) for r in got] == [(str(im), t) for im in images for t in "ab"]
    for path, task in zip(paths, "ab"):  # each task's answers equal the single-adapter predict
        assert main(["predict", "--adapter", str(path), "--json", "--top-k", "3", *map(str, images)]) == 0
        alone = json.loads(capsys.readouterr().out)
        mine = [r for r in got if r["task"] == task]
        for m, a in zip(mine, alone):
            assert [t["label"] for t in m["top"]] == [t["label"] for t in a["top"]]
            np.testing.assert_allclose([t["prob"] for t in m["top"]], [t["prob"] for t in a["top"]], atol=1e-5)
    # Adapters at different image sizes cannot share a bank: one line, exit status 2.
    torch.manual_seed(0)
    other = hl.attach(hl.create_backbone("vit_tiny_patch16_224", num_classes=3, img_size=48, pretrained=False),
                      hl.HeartLoRAConfig(rank=2), verify=False)
    hl.save_adapter(other, tmp_path / "big.safetensors", extra_metadata={"heartlora_run": {"pretrained": False}})
    assert main(["predict", "--adapter", str(paths[0]), "--adapter", str(tmp_path / "big.safetensors"),
                 str(images[0])]) == 2
    assert "different image sizes" in capsys.readouterr().err


def test_a_bank_serves_half_precision_files_as_their_own_model_does(tmp_path):
    """Files stored at float16 (a float adapter) and bfloat16 (a 1-bit one's mean and std) beside a float32 one:
    each row gets the logits of its own file loaded alone."""
    paths = {task: _make_adapter(tmp_path, _vit, task, *CASES[task], seed=i) for i, task in enumerate("abc")}
    hl.convert_adapter(paths["a"], tmp_path / "a16.safetensors", "float16")
    hl.convert_adapter(paths["b"], tmp_path / "b16.safetensors", "bfloat16")
    paths["a"], paths["b"] = tmp_path / "a16.safetensors", tmp_path / "b16.safetensors"
    bank = hl.AdapterBank(_vit(10))
    for path in paths.values():
        bank.add(path)
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    got = bank(x, ["a", "b", "c", "a"])
    for i, task in enumerate(["a", "b", "c", "a"]):
        want = _own_logits(_vit, paths[task], CASES[task][0], x[i:i + 1])[0]
        torch.testing.assert_close(got[i], want, atol=ATOL, rtol=RTOL)


def test_images_are_moved_to_the_models_device(tmp_path, monkeypatch):
    """A server decodes images on the CPU; a bank whose model is on a GPU ran them there as CPU tensors and failed
    every request. The model's forward here stands in for one on another device (meta): it records where its input
    is, and answers on the CPU."""
    bank = hl.AdapterBank(_vit(10))
    bank.add(_make_adapter(tmp_path, _vit, "t", 3, 32, 4, 2, seed=0), name="t")
    seen = []
    bank.model.to("meta")
    monkeypatch.setattr(bank.model, "forward", lambda x: (seen.append(x.device), torch.zeros(len(x), 10))[1])
    out = bank.answer(torch.rand(2, 3, 32, 32), ["t", "t"], k=2)
    assert seen == [torch.device("meta")] and len(out) == 2 and len(out[0]) == 2


def test_a_bank_refuses_images_of_another_size_and_bad_arguments_in_one_line_and_takes_a_cast(tmp_path):
    """A backbone that interpolates its position embeddings would answer 48 px images of a 32 px task, wrongly; a
    model cast to bfloat16 takes the float32 images a server decodes (as the task's own bf16 model does)."""
    path = _make_adapter(tmp_path, _vit, "a", 4, 32, 4, 0, seed=0)
    bank = hl.AdapterBank(_vit(4))
    bank.add(path)
    with pytest.raises(ConfigError, match=r"the images are 48×48 px and task 'a' runs at 32 px: resize them to 32"):
        bank(torch.rand(2, 3, 48, 48), "a")
    with pytest.raises(ConfigError, match="got a list: torch.stack them"):
        bank([torch.rand(3, 32, 32)], "a")
    with pytest.raises(ConfigError, match="tasks must be a task name or one name per row, got NoneType"):
        bank(torch.rand(1, 3, 32, 32), None)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    bank.model.to(torch.bfloat16)
    got = bank(x, "a")
    want = bank(x.to(torch.bfloat16), "a")
    assert all(torch.equal(g, w) for g, w in zip(got, want)) and got[0].dtype == torch.bfloat16
    with pytest.raises(AdapterFileError, match="whose weights are torch.bfloat16: .* add adapters to a float32 bank"):
        bank.add(path, name="again")  # the cast weights' fingerprint is not the float32 one the file records


def test_a_saved_module_besides_the_classifier_keeps_its_own_width(tmp_path):
    """Only the classifier takes the task's class count: a saved MLP Linear of another width was rebuilt as a
    (in, classes) Linear and the adapter refused; it loads, and rows equal the task's own model."""
    model = hl.attach(_vit(5), hl.HeartLoRAConfig(rank=2, modules_to_save=("head", "backbone.blocks.1.mlp.fc2")),
                     verify=False)
    with torch.no_grad():
        model.get_submodule("backbone.blocks.1.mlp.fc2").weight.add_(0.05)
    path = tmp_path / "m.safetensors"
    hl.save_adapter(model, path, extra_metadata={"heartlora_run": {"task": "m", "pretrained": False,
                                                                   "init_seed": 0}})
    bank = hl.AdapterBank(_vit(10))
    bank.add(path)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    got = bank(x, "m")
    want = _own_logits(_vit, path, 5, x)
    for i in range(2):
        torch.testing.assert_close(got[i], want[i], atol=ATOL, rtol=RTOL)
