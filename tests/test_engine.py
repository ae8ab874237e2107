"""The training engine on a tiny random ViT (timm ``test_vit``: 6 layers × 2 heads) and a tiny four-class task
(96 training images, written as a VTAB-1K folder so that torchrun's processes can read it too)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from heartlora.engine import TrainConfig, load_trained, resolve, train
from heartlora.engine.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from heartlora.engine.distributed import DistInfo, shard
from heartlora.engine.training_methods import METHODS
from heartlora.engine.metrics import REQUIRED_KEYS, accuracy
from heartlora.engine.plots import responsiveness_heatmap
from heartlora.engine.trainer import RUN_FILES, lr_factor
from heartlora.errors import ConfigError

TINY = dict(backbone="test_vit", pretrained=False, img_size=32, batch_size=32, progress=False)
HEADS = 12  # test_vit: 6 layers × 2 heads


def tiny(out: Path, task: str, **kw) -> TrainConfig:
    return TrainConfig(**{**TINY, "task": task, "epochs": 2, "out": str(out), **kw})


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_trains_end_to_end(tmp_path: Path, task: str, method: str) -> None:
    layer = METHODS[method].defaults.get("scope") == "layer"  # 1 of the 2 heads in each of the 6 layers
    ne = (1 if layer else 3) if METHODS[method].heart else None
    metrics = train(tiny(tmp_path, task, method=method, ne=ne))
    for name in ("metrics.json", "adapter.safetensors", "curves.png", "train.log", "checkpoint.pt"):
        assert (tmp_path / name).is_file(), name
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert set(REQUIRED_KEYS) <= set(saved)
    assert saved["accuracy_split"] == "val200" and saved["train_split"] == "train800"
    assert 0.0 <= saved["accuracy"] <= 1.0 and math.isfinite(saved["final_train_loss"])
    assert saved["method"] == method and saved["settings"]["epochs"] == 2
    if METHODS[method].adapters:
        assert (tmp_path / "responsiveness.png").is_file()
        assert saved["heads_total"] == HEADS and saved["adapter_bytes"] > 0
        assert len(saved["heads_off"]) == ((6 if layer else 3) if METHODS[method].heart else 0)
        assert set(saved["responsiveness"]) == set(saved["head_masks"])
        modules = len(saved["head_masks"])
        assert saved["coverage"] == f"adapted {modules} of {modules} attention modules"
    else:
        assert saved["heads_off"] == []
        assert (saved["adapter_bytes"] == 0) == (method == "linear")
    # The stored model gives the reported accuracy again.
    model, _ = load_trained(tmp_path / "adapter.safetensors")
    from heartlora.data import get_task

    x, y = get_task(task).load("val200", img_size=32)
    assert accuracy(model, x, y, DistInfo(0, 1, 0, torch.device("cpu"))) == pytest.approx(metrics["accuracy"])


def test_a_run_folder_loads_back_for_inference_from_the_top_level_api(tmp_path: Path, task: str) -> None:
    import heartlora as hl
    from heartlora.data import get_task
    from heartlora.errors import AdapterFileError

    metrics = train(tiny(tmp_path / "run", task, method="heart-lora", ne=3))
    model, info = hl.load_trained(tmp_path / "run")  # the folder stands for its adapter.safetensors
    assert not model.training and info["run"]["img_size"] == 32 and info["run"]["class_names"] == ["0", "1", "2", "3"]
    x, y = get_task(task).load("val200", img_size=info["run"]["img_size"])
    with torch.no_grad():  # float images in [0, 1], as the docstring says
        acc = (model(x.float() / 255).argmax(1) == y).float().mean().item()
    assert acc == pytest.approx(metrics["accuracy"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterFileError, match="is a folder without adapter.safetensors"):
        hl.load_trained(tmp_path / "empty")


def test_quantized_adapters_are_smaller_and_heads_off_save_bytes(tmp_path: Path, task: str) -> None:
    sizes = {m: train(tiny(tmp_path / m, task, method=m, epochs=1, ne=4 if "heart" in m else None))["adapter_bytes"]
             for m in ("lora", "heart-lora", "bi-lora", "heart-bi-lora")}
    assert sizes["bi-lora"] < sizes["lora"] and sizes["heart-lora"] < sizes["lora"]
    assert sizes["heart-bi-lora"] < sizes["bi-lora"]


def _stop_and_resume(out: Path, task: str, stops: list[int], **kw) -> dict:
    for k in stops:
        result = train(tiny(out, task, resume=True, stop_after_epoch=k, **kw))
        assert result["status"] == "stopped" and result["epochs_done"] == k and len(result["history"]) == k
        assert set(REQUIRED_KEYS) <= set(result)  # one shape, whether stopped or finished
        assert not (out / "metrics.json").exists()
    return train(TrainConfig(out=str(out), resume=True, progress=False))  # flags come from the checkpoint


def test_resume_gives_the_uninterrupted_result(tmp_path: Path, task: str) -> None:
    kw = dict(method="heart-lora", ne=3, epochs=3, warmup_epochs=1, dropout=0.1)  # dropout: RNG state matters
    whole = train(tiny(tmp_path / "whole", task, **kw))
    # Stopped at the end of warmup (before the switch-off is checkpointed in a later epoch) and after it.
    resumed = _stop_and_resume(tmp_path / "parts", task, [1, 2], **kw)
    assert resumed["heads_off"] == whole["heads_off"]
    assert resumed["accuracy"] == whole["accuracy"]
    assert resumed["final_train_loss"] == pytest.approx(whole["final_train_loss"], rel=1e-6)
    a, b = load_file(tmp_path / "whole" / "adapter.safetensors"), load_file(tmp_path / "parts" / "adapter.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=1e-7)
    # Resuming a finished run trains nothing and returns its metrics.
    again = train(TrainConfig(out=str(tmp_path / "parts"), resume=True, progress=False))
    assert again["status"] == "already_finished" and again["accuracy"] == whole["accuracy"]
    # ... the same dict as the run that finished it: metrics.json's content (schema_version, sha256 included)
    assert {k: v for k, v in again.items() if k != "status"} == json.loads((tmp_path / "parts" / "metrics.json")
                                                                           .read_text())
    assert resumed.keys() == again.keys() and resumed["sha256"] == again["sha256"]


def test_evaluating_less_often_trains_the_same_model(tmp_path: Path, task: str) -> None:
    """Few-shot runs evaluate val200 every few epochs (the step floor multiplies their epochs); that must not move
    a single trained weight, also with dropout drawing from the RNG."""
    kw = dict(method="heart-lora", ne=3, epochs=3, warmup_epochs=1, dropout=0.1)
    every = train(tiny(tmp_path / "every", task, **kw))
    sparse = train(tiny(tmp_path / "sparse", task, eval_every=2, **kw))
    assert [h.get("eval_acc") is not None for h in sparse["history"]] == [False, True, True]  # 2nd and the last
    assert sparse["accuracy"] == every["accuracy"] and sparse["heads_off"] == every["heads_off"]
    assert sparse["final_train_loss"] == every["final_train_loss"]
    a, b = load_file(tmp_path / "every" / "adapter.safetensors"), load_file(tmp_path / "sparse" / "adapter.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_other_settings(tmp_path: Path, task: str) -> None:
    train(tiny(tmp_path, task, method="lora", stop_after_epoch=1))
    with pytest.raises(ConfigError, match=r"lr 0\.5 \(run has 0\.001\)") as e:  # the field; the CLI shows --lr
        train(tiny(tmp_path, task, method="lora", lr=0.5, resume=True))
    assert "--lr 0.5 (run has 0.001)" in e.value.for_cli()


def test_output_folder_of_another_run_is_refused_and_kept(tmp_path: Path, task: str) -> None:
    train(tiny(tmp_path, task, method="linear", epochs=1))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(ConfigError, match="already holds") as e:
        train(tiny(tmp_path, task, method="lora", epochs=1))
    assert "pass resume=True to continue that run, overwrite=True to replace" in str(e.value)  # Python's names
    assert "pass --resume to continue that run, --overwrite to replace" in e.value.for_cli()  # the flags
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    # --overwrite replaces the run's files but leaves a user's own files alone.
    (tmp_path / "notes.txt").write_text("mine")
    train(tiny(tmp_path, task, method="lora", epochs=1, overwrite=True))
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert json.loads((tmp_path / "metrics.json").read_text())["method"] == "lora"


def test_impossible_ne_fails_before_anything_is_written(tmp_path: Path, task: str) -> None:
    with pytest.raises(ConfigError, match="ne 13 is more than"):
        train(tiny(tmp_path / "run", task, method="heart-lora", ne=HEADS + 1))
    with pytest.raises(ConfigError, match="per layer"):
        train(tiny(tmp_path / "run", task, method="heart-lora", ne=3, scope="layer"))
    assert not (tmp_path / "run").exists()


def test_defaults_profiles_and_overrides() -> None:
    paper = resolve(TrainConfig(task="digits"))
    assert (paper.img_size, paper.epochs, paper.batch_size, paper.warmup_epochs) == (224, 100, 64, 10)
    assert (paper.lr, paper.weight_decay, paper.drop_path, paper.seed, paper.rank) == (1e-3, 1e-4, 0.0, 42, 8)
    assert paper.scale == 4.0  # chosen on val200 (docs/research/sweeps/defaults.md), as the 1-bit methods' 16 below
    assert paper.targets == ("q", "v") and paper.method == "heart-lora"
    assert paper.ne == "auto" and paper.ne_fraction is None and paper.ne_tolerance == 0.02  # chosen on data
    assert paper.pool == "cls+mean"  # DINOv2's own convention (the default backbone is dinov2_small)
    assert resolve(TrainConfig(task="digits", backbone="vit_tiny_patch16_224")).pool == "cls"
    assert resolve(TrainConfig(task="digits", pool="cls")).pool == "cls"  # asked for: kept
    assert resolve(TrainConfig(task="digits", ne="12")).ne == 12  # the command line gives strings
    assert resolve(TrainConfig(task="digits", ne="AUTO")).ne == "auto"
    assert resolve(TrainConfig(task="digits", method="lora")).ne_tolerance is None
    assert paper.ne_refine is True and resolve(TrainConfig(task="digits", ne_refine=False)).ne_refine is False
    assert resolve(TrainConfig(task="digits", ne=12)).ne_refine is None
    cpu = resolve(TrainConfig(task="digits", profile="cpu", img_size=64))
    assert cpu.img_size == 64 and cpu.epochs == 10 and cpu.batch_size == 32 and cpu.warmup_epochs == 1
    assert any("profile cpu" in n for n in cpu.notes)
    assert resolve(TrainConfig(task="digits", epochs=50)).warmup_epochs == 5
    assert resolve(TrainConfig(task="digits", method="bi-lora")).bits == 1
    assert [resolve(TrainConfig(task="digits", method=m)).scale for m in ("bi-lora", "heart-bi-lora", "lora")] == \
        [16.0, 16.0, 4.0]
    assert resolve(TrainConfig(task="digits", method="bi-lora", scale=2.0)).scale == 2.0  # asked for: kept
    one_bit = resolve(TrainConfig(task="digits", method="lora", bits=1))  # a float method with 1-bit adapters
    assert one_bit.scale == 16.0 and any("--bits 1: scale 16" in n for n in one_bit.notes)
    assert resolve(TrainConfig(task="digits", method="lora", bits=1, scale=3.0)).scale == 3.0
    assert resolve(TrainConfig(task="digits", method="lora", bits=2)).scale == 4.0  # only 1 bit was chosen for
    assert resolve(TrainConfig(task="digits", method="linear")).drop_path == 0.0
    for bad in (dict(method="nope"), dict(method="lora", ne=3), dict(ne=2, ne_fraction=0.1), dict(epochs=0),
                dict(ne="some"), dict(ne=3, ne_tolerance=0.1), dict(ne_tolerance=-1.0),
                dict(method="lora", ne_tolerance=0.1), dict(ne=3, ne_refine=False),
                dict(method="lora", ne_refine=False),
                dict(protocol="test"), dict(method="full", bits=1), dict(warmup_epochs=0), dict(threads=0)):
        with pytest.raises(ConfigError):
            resolve(TrainConfig(task="digits", **bad))


def test_schedule_warms_up_then_decays_to_the_floor() -> None:
    lrs = [lr_factor(s, 10, 100, 0.01) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and lrs[-1] == pytest.approx(0.01, abs=1e-3)


def test_checkpoints_hold_no_code_and_damage_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"epoch": 3, "model": {"w": torch.ones(2)}, "settings": "{}"})
    assert load_checkpoint(path)["epoch"] == 3
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_checkpoint(path)


def test_shards_of_a_batch_cover_it_exactly() -> None:
    batch = torch.randperm(64)[:37]
    parts = [shard(batch, DistInfo(r, 3, r, torch.device("cpu"))) for r in range(3)]
    assert sorted(torch.cat(parts).tolist()) == sorted(batch.tolist())


def test_heatmap_handles_layers_with_different_head_counts(tmp_path: Path) -> None:
    scores = {"stage0": [1.0, 2.0], "stage1": [0.5, 3.0, 1.0, 0.1], "stage2": [2.0] * 8}
    masks = {"stage0": [True, False], "stage1": [True, True, True, False], "stage2": [True] * 8}
    path = responsiveness_heatmap(tmp_path / "h.png", scores, masks, title="swin-like")
    assert path.stat().st_size > 1000
    assert responsiveness_heatmap(tmp_path / "masks_only.png", None, masks).is_file()


def test_run_files_list_matches_what_a_run_writes(tmp_path: Path, task: str) -> None:
    train(tiny(tmp_path, task, method="heart-lora", ne=2, epochs=1, protocol="final"))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(RUN_FILES)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["accuracy_split"] == "test" and metrics["train_split"] == "train800val200"
    assert all(h["eval_acc"] is None for h in metrics["history"])  # nothing looked at test during training
    assert metrics["selection"].endswith("test is evaluated once, after training")


def test_a_registered_method_trains_in_the_engine_loop(tmp_path: Path, task: str) -> None:
    """The PEFT baseline is a TrainingMethod: same loop, schedule, checkpoint and metrics as lora; only the adapter
    implementation differs."""
    pytest.importorskip("peft")
    from test_backbones import _tiny_hf_dir

    from heartlora.engine.training_methods import get_method
    from heartlora_bench.peft_lora import PEFT_LORA

    # found through the benchmarks' package's entry point (heartlora.methods), not by importing it first
    assert get_method("peft-lora") is PEFT_LORA and "peft-lora" in METHODS
    hf = str(_tiny_hf_dir(tmp_path, "vit"))
    kw = dict(TINY, backbone=hf, epochs=2, drop_path=0.0)
    peft = train(TrainConfig(**kw, task=task, method="peft-lora", out=str(tmp_path / "peft")))
    ours = train(TrainConfig(**kw, task=task, method="lora", out=str(tmp_path / "lora")))
    assert peft["status"] == "finished" and peft["method"] == "peft-lora"
    # r 8 on q and v of 2 layers of width 32: (8·32 + 32·8) floats per projection, as heartlora's LoRA stores
    assert peft["adapter_bytes"] == ours["adapter_bytes"] == 2 * 2 * (8 * 32 + 32 * 8) * 4
    assert peft["trainable_params"] == ours["trainable_params"]
    assert [h["lr"] for h in peft["history"]] == [h["lr"] for h in ours["history"]]  # one schedule
    # B starts at zero in both: the first step's loss is the backbone's, so the first epochs agree closely
    assert peft["history"][0]["train_loss"] == pytest.approx(ours["history"][0]["train_loss"], rel=0.05)
    assert (tmp_path / "peft" / "checkpoint.pt").is_file()


def test_schedule_state_loads_with_weights_only_also_from_older_checkpoints(tmp_path: Path) -> None:
    from heartlora.engine.state import TrainState
    from heartlora.engine.trainer import make_schedule

    def fresh() -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
        opt = torch.optim.AdamW(torch.nn.Linear(2, 2).parameters(), lr=1.0)
        return opt, make_schedule(opt, 10, 100, 0.01)

    opt, sched = fresh()
    for _ in range(25):
        opt.step()
        sched.step()
    torch.save(sched.state_dict(), tmp_path / "s.pt")
    state = torch.load(tmp_path / "s.pt", weights_only=True)
    opt2, sched2 = fresh()
    sched2.load_state_dict(state)
    sched2.step()
    sched.step()
    assert sched2.get_last_lr() == sched.get_last_lr() == [lr_factor(26, 10, 100, 0.01)]
    # The former LambdaLR subclass stored no lr_lambdas: such a checkpoint still resumes.
    old = {k: state[k] for k in ("last_epoch", "_step_count", "base_lrs", "_last_lr")}
    ckpt = TrainState(settings={}).to_checkpoint() | {"schedule": old, "rng": None}
    _, sched3 = fresh()
    sched3.load_state_dict(TrainState.from_checkpoint(ckpt).schedule)
    assert sched3.last_epoch == 25


def test_ne_auto_chooses_on_sampled_training_images_and_records_why(tmp_path: Path, task: str) -> None:
    metrics = train(tiny(tmp_path, task, method="heart-lora", epochs=2, warmup_epochs=1))
    choice = metrics["ne_choice"]
    assert metrics["settings"]["ne"] == "auto" and choice is not None
    coarse = [c for c in choice["candidates"] if not c["refine"]]
    fractions = [c["fraction"] for c in coarse]
    assert fractions[0] == 0.0 and fractions == sorted(fractions)
    assert choice["fraction"] in [c["fraction"] for c in choice["candidates"] if c["passes"]]
    assert 0 <= choice["ne"] <= metrics["heads_total"]
    assert metrics["heads_off_count"] == choice["ne"]  # the choice is what was switched off
    assert all(c["passes"] for c in coarse[:-1])  # the search stops at the first failure
    assert len(choice["candidates"]) - len(coarse) <= 1  # at most one refining share, after the coarse ones
    assert 0 < choice["images"] <= 256 and "sampled training images" in choice["rule"]
    assert 0 < choice["seconds"] < metrics["wall_s"]  # what choosing cost, part of the run's time
    assert json.loads((tmp_path / "metrics.json").read_text())["ne_choice"] == choice
    assert len(choice["candidates"]) - len(coarse) <= 1 and "halfway" in choice["rule"]  # --ne-refine: the default


def test_ne_refine_reaches_the_choice(tmp_path: Path, task: str) -> None:
    # at tolerance 0 the first share (2 of the 12 heads) fails; the refined search (the default) then tries 1 head
    # (halfway to 0), which fails too here, so nothing goes off; the extra candidate is recorded after the coarse ones
    metrics = train(tiny(tmp_path / "on", task, method="heart-lora", epochs=2, warmup_epochs=1, ne_tolerance=0.0))
    choice = metrics["ne_choice"]
    assert metrics["settings"]["ne_refine"] is True and "halfway" in choice["rule"]
    assert [(c["heads_off"], c["passes"], c["refine"]) for c in choice["candidates"]] == [
        (0, True, False), (2, False, False), (1, False, True)]
    assert choice["ne"] == metrics["heads_off_count"] == 0
    # --no-ne-refine: the coarse search alone, the same run otherwise
    off = train(tiny(tmp_path / "off", task, method="heart-lora", epochs=2, warmup_epochs=1, ne_tolerance=0.0,
                     ne_refine=False))
    assert off["settings"]["ne_refine"] is False and "halfway" not in off["ne_choice"]["rule"]
    assert off["ne_choice"]["candidates"] == choice["candidates"][:2]


def test_few_shot_runs_get_a_floor_of_optimizer_steps() -> None:
    from heartlora.engine.settings import MIN_FEWSHOT_STEPS

    cfg = resolve(TrainConfig(task="digits@4shot", profile="cpu"))  # 40 images: 2 steps an epoch at batch 32
    assert cfg.epochs * math.ceil(40 / cfg.batch_size) >= MIN_FEWSHOT_STEPS > 10 * 2
    assert cfg.epochs == MIN_FEWSHOT_STEPS // 2 and cfg.warmup_epochs == round(0.1 * cfg.epochs)
    assert any("few-shot" in n for n in cfg.notes)
    assert resolve(TrainConfig(task="digits@4shot", profile="cpu", epochs=7)).epochs == 7  # asked for: kept
    assert resolve(TrainConfig(task="digits", profile="cpu")).epochs == 10
    # as many val200 evaluations as the profile's 10 epochs, unless --eval-every is given
    assert cfg.eval_every == 5
    assert resolve(TrainConfig(task="digits@4shot", profile="cpu", eval_every=1)).eval_every == 1
    assert resolve(TrainConfig(task="digits@4shot", profile="cpu", epochs=7)).eval_every == 1
    assert resolve(TrainConfig(task="digits", profile="cpu")).eval_every == 1


def test_resuming_with_the_same_flags_as_typed_is_accepted() -> None:
    """The command line gives strings and "auto"s; the saved settings hold resolved values."""
    saved = resolve(TrainConfig(task="digits", ne=3)).settings()
    again = resolve(TrainConfig(task="digits", ne="3", pool="auto", targets="q,v"), saved)
    assert again.ne == 3 and again.pool == "cls+mean" and again.targets == ("q", "v")
    with pytest.raises(ConfigError, match="ne 4 "):
        resolve(TrainConfig(task="digits", ne="4"), saved)
    assert resolve(TrainConfig(task="digits", targets="v,q"), saved).targets == ("q", "v")  # any order: the same
    with pytest.raises(ConfigError, match="pool cls"):
        resolve(TrainConfig(task="digits", pool="cls"), saved)


def test_a_map_without_scores_does_not_call_itself_responsiveness(tmp_path: Path, monkeypatch) -> None:
    import heartlora.engine.plots as plots

    titles = []
    monkeypatch.setattr(plots, "_save", lambda fig, path, dpi: titles.append(fig.axes[0].get_title()) or Path(path))
    masks = {"blocks.0.attn": [True, False], "blocks.1.attn": [True, True]}
    responsiveness_heatmap(tmp_path / "a.png", {"blocks.0.attn": [0.5, 0.1], "blocks.1.attn": [1.0, 0.2]}, masks)
    responsiveness_heatmap(tmp_path / "b.png", None, masks)  # a run that scored nothing (lora, or one epoch)
    assert titles[0].startswith("responsiveness (÷ max)") and "(1/4 heads)" in titles[0]
    assert "responsiveness" not in titles[1] and titles[1].startswith("no head was scored")


def test_the_ne_choice_inside_an_epoch_is_not_training_time_and_any_valid_seed_trains(
        tmp_path: Path, task: str, monkeypatch) -> None:
    # --score-steps ends warmup inside an epoch: ne auto's forward passes were timed as training steps (images/s
    # halved on a tiny run). A stand-in choice that takes 1,000 s of a stand-in clock shows what the epoch counts.
    import heartlora.engine.trainer as engine

    offset = [0.0]
    monkeypatch.setattr(engine.time, "perf_counter", lambda real=engine.time.perf_counter: real() + offset[0])
    choose = engine.Trainer.end_of_warmup

    def slow_choice(self) -> None:
        choose(self)
        offset[0] += 1000.0

    monkeypatch.setattr(engine.Trainer, "end_of_warmup", slow_choice)
    # seed 2**62 is valid (0 to 2**63 - 1): the epoch's shuffle seed overflowed torch's 64 bits at the first epoch
    metrics = train(tiny(tmp_path, task, method="heart-lora", ne="auto", epochs=2, score_steps=3, seed=2**62))
    first = metrics["history"][0]
    assert offset[0] == 1000.0 and first["time_s"] < 1000.0
    assert metrics["wall_s"] >= 1000.0  # the wall clock still counts it
    assert metrics["selection"].endswith("on val200; test is not evaluated")  # it said test was evaluated


def test_evaluating_restores_each_modules_own_mode() -> None:
    from heartlora.method.model import evaluating, train_adapters_mode

    net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.BatchNorm1d(3), torch.nn.BatchNorm1d(3))
    net.requires_grad_(False)
    net[2].weight.requires_grad_(True)  # a norm that trains keeps updating its statistics
    train_adapters_mode(net)
    assert [m.training for m in net] == [True, False, True]
    with evaluating(net):
        assert not any(m.training for m in net.modules())
    assert [m.training for m in net] == [True, False, True]  # model.train(True) would have turned net[1] on
