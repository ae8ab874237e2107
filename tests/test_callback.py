"""HeartLoRACallback in a real transformers.Trainer run on a tiny ViT: scores during warmup, switches heads off with
the Trainer's optimizer, keeps training the heads that stay."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import heartlora as hl
from heartlora.errors import ConfigError
from heartlora.integrations import HeartLoRACallback


def _model():
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    cfg = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=16,
                    patch_size=8, num_labels=3)
    return ViTForImageClassification(cfg)


def _data(n=16):
    g = torch.Generator().manual_seed(1)
    return [{"pixel_values": torch.rand(3, 16, 16, generator=g), "labels": int(i % 3)} for i in range(n)]


def _trainer(model, callback, tmp_path, steps=5, seed=0):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=4,
                             learning_rate=1e-2, use_cpu=True, report_to=[], save_strategy="no",
                             logging_strategy="no", disable_tqdm=True, seed=seed, dataloader_num_workers=0)
    return Trainer(model=model, args=args, train_dataset=_data(), callbacks=[callback])


def test_callback_scores_then_switches_heads_off(tmp_path):
    model = hl.attach(_model(), hl.HeartLoRAConfig(targets=("q", "v"), rank=2))
    cb = HeartLoRACallback(warmup_steps=2, ne=3)
    trainer = _trainer(model, cb, tmp_path)
    trainer.train()
    # Scored on exactly the warmup steps, with the step's gradients present (B starts at zero, so the first step
    # contributes nothing and the second must).
    assert cb.tracker.steps == 2
    assert sum(float(s.sum()) for s in cb.scores.values()) > 0
    masks = hl.head_masks(model)
    off = {(name, h) for name, m in masks.items() for h, on in enumerate(m) if not on}
    assert off == set(cb.heads_off) and len(off) == 3
    # The Trainer's optimizer holds the rebuilt factors, with AdamW state of their own shape, stepped after the switch.
    opt = trainer.optimizer
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    adapters = hl.adapter_parameters(model)
    assert all(id(p) in in_opt for p in adapters)
    assert len(in_opt) == len(adapters) + 2  # and the classifier's weight and bias, nothing else
    for p in adapters:
        st = opt.state[p]
        assert st["exp_avg"].shape == p.shape and int(st["step"]) == 5


def test_callback_random_control_draws_from_the_trainer_seed(tmp_path):
    offs = []
    for seed in (7, 7, 8):
        model = hl.attach(_model(), hl.HeartLoRAConfig(targets=("q", "v"), rank=2))
        cb = HeartLoRACallback(warmup_steps=2, ne=3, mode="random")
        _trainer(model, cb, tmp_path / str(len(offs)), seed=seed).train()
        expected = hl.ResponsivenessTracker(model, mode="random", seed=seed).scores()
        assert all(torch.equal(cb.scores[k], expected[k]) for k in expected)
        offs.append(sorted(cb.heads_off))
    assert offs[0] == offs[1] != offs[2]


def test_callback_refuses_a_model_without_heartlora_adapters(tmp_path):
    with pytest.raises(ConfigError, match="heartlora.attach"):
        _trainer(_model(), HeartLoRACallback(warmup_steps=1, ne=1), tmp_path, steps=1).train()


def test_callback_checks_its_settings():
    with pytest.raises(ConfigError, match=r"give ne \(a number of heads, or auto\) or fraction"):
        HeartLoRACallback(warmup_steps=2)
    with pytest.raises(ConfigError, match="at least 1"):
        HeartLoRACallback(warmup_steps=0, ne=1)


def test_callback_refuses_impossible_settings_before_training(tmp_path):
    """ne='auto' used to crash mid-train with a TypeError; ne above the head count, or a warmup as long as the run
    (no heads ever switched off), were found only at the end of the warmup or never."""
    with pytest.raises(ConfigError, match=r"ne='auto' chooses the count on a fixed sample .* pass heldout="):
        HeartLoRACallback(warmup_steps=2, ne="auto")
    with pytest.raises(ConfigError, match="heldout= is what ne='auto' chooses on"):
        HeartLoRACallback(warmup_steps=2, ne=1, heldout=[(torch.zeros(1, 3, 16, 16), torch.zeros(1).long())])
    with pytest.raises(ConfigError, match=r"fraction 1\.5 must be a share of the attention heads between 0 and 1"):
        HeartLoRACallback(warmup_steps=2, fraction=1.5)
    with pytest.raises(ConfigError, match="tolerance applies to ne auto only"):
        HeartLoRACallback(warmup_steps=2, ne=1, tolerance=0.1)
    model = hl.attach(_model(), hl.HeartLoRAConfig(targets=("q", "v"), rank=2))  # 2 layers of 4 heads
    with pytest.raises(ConfigError, match="ne 9 is more than the model's 8 attention heads"):
        _trainer(model, HeartLoRACallback(warmup_steps=1, ne=9), tmp_path, steps=3).train()
    with pytest.raises(ConfigError, match="ne 5 is more than the model's 4 heads in its smallest layer"):
        _trainer(model, HeartLoRACallback(warmup_steps=1, ne=5, scope="layer"), tmp_path, steps=3).train()
    with pytest.raises(ConfigError, match="warmup_steps 3 is not below the run's 3 optimizer steps"):
        _trainer(model, HeartLoRACallback(warmup_steps=3, ne=1), tmp_path, steps=3).train()
    assert all(all(m) for m in hl.head_masks(model).values())


def test_callback_chooses_ne_auto_on_heldout_batches_as_train_does(tmp_path):
    """ne='auto' goes through the same parser and the same choice as `heartlora train --ne auto`: at an infinite
    tolerance every candidate share passes and the largest is switched off, with the evidence in ``choice``."""
    model = hl.attach(_model(), hl.HeartLoRAConfig(targets=("q", "v"), rank=2))
    data = _data(8)
    heldout = [(torch.stack([d["pixel_values"] for d in data]), torch.tensor([d["labels"] for d in data]))]
    cb = HeartLoRACallback(warmup_steps=2, ne="auto", tolerance=1e9, heldout=heldout)
    assert cb.rule.refine is True and cb.rule.tolerance == 1e9
    _trainer(model, cb, tmp_path).train()
    assert cb.choice is not None and cb.choice.fraction == max(c["fraction"] for c in cb.choice.candidates) > 0
    assert len(cb.heads_off) == cb.choice.ne == sum(not on for m in hl.head_masks(model).values() for on in m) > 0


def test_ecosystem_example_runs(tmp_path, capsys):
    import re
    from pathlib import Path

    doc = Path(__file__).resolve().parents[1] / "docs" / "ECOSYSTEM.md"
    code = re.search(r"```python\n(.*?)```", doc.read_text(), re.DOTALL).group(1)
    exec(compile(code.replace("/tmp/hl-trainer", str(tmp_path)), str(doc), "exec"), {})  # noqa: S102 (the doc's own code)
    lines = capsys.readouterr().out.splitlines()
    assert lines[-2].startswith("3 heads off:") and lines[-1] == "5 heads on"


def test_ecosystem_save_and_load_example_runs(tmp_path, capsys):
    """The second example continues the first: trainer.save_model, then the three loads: heartlora's exact,
    PEFT's and transformers' (the same LoRA product in another order) within float rounding."""
    import re
    from pathlib import Path

    pytest.importorskip("peft")
    if int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip("from_pretrained(DIR) of the example's random model needs transformers 5 (4.x builds the base "
                    "named in adapter_config.json, which a model made from a config does not have)")
    doc = Path(__file__).resolve().parents[1] / "docs" / "ECOSYSTEM.md"
    blocks = re.findall(r"```python\n(.*?)```", doc.read_text(), re.DOTALL)
    save = next(b for b in blocks if "trainer.save_model" in b)
    namespace: dict = {}
    for code in (blocks[0], save):
        exec(compile(code.replace("/tmp/hl-trainer", str(tmp_path)), str(doc), "exec"), namespace)  # noqa: S102
    diffs = [float(line) for line in capsys.readouterr().out.splitlines()[-3:]]
    assert len(diffs) == 3 and diffs[0] == 0.0 and max(diffs) <= 1e-7, diffs  # a few float32 ulps of these logits


def _train_saving(model, callback, out, steps=6, save_steps=2, resume=None, **kw):
    """A Trainer run that writes checkpoints every ``save_steps`` steps (the callback saves its adapters with each);
    ``kw``: more TrainingArguments (with an eval strategy, the run evaluates on the training data)."""
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(**{"output_dir": str(out), "max_steps": steps, "per_device_train_batch_size": 4,
                                "learning_rate": 1e-2, "use_cpu": True, "report_to": [], "save_strategy": "steps",
                                "save_steps": save_steps, "logging_strategy": "no", "disable_tqdm": True, "seed": 0,
                                "dataloader_num_workers": 0, **kw})
    trainer = Trainer(model=model, args=args, train_dataset=_data(), callbacks=[callback],
                      eval_dataset=_data(8) if "eval_strategy" in kw else None)
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def _logits(model):
    x = torch.stack([row["pixel_values"] for row in _data(8)])
    model.eval()
    with torch.no_grad():
        return model(pixel_values=x).logits


def test_trainer_save_model_loads_back_exactly_every_way(tmp_path):
    """trainer.save_model used to write the adapted Linears under names transformers does not know: from_pretrained
    re-initialised q and v (logits off by 0.09) and hl.load_adapter refused the folder."""
    model = hl.attach(_model(), hl.HeartLoRAConfig(targets=("q", "v"), rank=2))
    cb = HeartLoRACallback(warmup_steps=2, ne=3)
    trainer = _train_saving(model, cb, tmp_path / "run")
    trainer.save_model(str(tmp_path / "final"))
    trained = _logits(model)
    final = tmp_path / "final"
    for d in (final, tmp_path / "run" / "checkpoint-6"):
        assert {"config.json", "model.safetensors", "adapter.safetensors"} <= {p.name for p in d.iterdir()}
    loaded = hl.load_adapter(final)
    assert {(n, h) for n, m in hl.head_masks(loaded).items() for h, on in enumerate(m) if not on} == set(cb.heads_off)
    torch.testing.assert_close(_logits(loaded), trained, atol=1e-6, rtol=0)
    # The Trainer's own files alone: the frozen backbone under transformers' names, loaded without a report of
    # missing or unexpected weights, and the trained classifier.
    from transformers import ViTForImageClassification

    pytest.importorskip("peft")
    from peft import PeftModel

    if int(transformers.__version__.split(".")[0]) >= 5:  # 4.x loads the base named in adapter_config.json instead
        plain, info = ViTForImageClassification.from_pretrained(str(final), output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"]
        torch.testing.assert_close(_logits(plain), trained, atol=1e-6, rtol=0)  # with the embedded PEFT adapter
    peft_model = PeftModel.from_pretrained(_model(), str(final))  # the documented PEFT load, on the original base
    torch.testing.assert_close(_logits(peft_model), trained, atol=1e-6, rtol=0)
    assert not torch.allclose(_logits(_model()), trained, atol=1e-3)  # the comparison can fail


def test_trainer_resumes_from_its_checkpoints_with_the_heads_off(tmp_path):
    """Resuming was refused (the heads off were not in the checkpoint). From a checkpoint during the warmup (the
    partial scores) and one after the switch (the heads off, the optimizer's rebuilt Parameters), the resumed run
    ends where the uninterrupted one does."""
    cfg = hl.HeartLoRAConfig(targets=("q", "v"), rank=2)
    model = hl.attach(_model(), cfg)
    cb = HeartLoRACallback(warmup_steps=3, ne=3)
    _train_saving(model, cb, tmp_path / "run")
    want = _logits(model)
    for step in (2, 4):
        again = hl.attach(_model(), cfg)
        cb2 = HeartLoRACallback(warmup_steps=3, ne=3)
        trainer = _train_saving(again, cb2, tmp_path / "run", resume=str(tmp_path / "run" / f"checkpoint-{step}"))
        assert sorted(cb2.heads_off) == sorted(cb.heads_off)
        torch.testing.assert_close(_logits(again), want, atol=1e-6, rtol=0)
        for p in hl.adapter_parameters(again):
            assert trainer.optimizer.state[p]["exp_avg"].shape == p.shape


def test_trainer_resume_without_the_callbacks_adapter_is_refused(tmp_path):
    cfg = hl.HeartLoRAConfig(targets=("q", "v"), rank=2)
    _train_saving(hl.attach(_model(), cfg), HeartLoRACallback(warmup_steps=3, ne=3), tmp_path, steps=4)
    (tmp_path / "checkpoint-4" / "adapter.safetensors").unlink()
    with pytest.raises(ConfigError, match="resuming at step 4 needs .*adapter.safetensors"):
        _train_saving(hl.attach(_model(), cfg), HeartLoRACallback(warmup_steps=3, ne=3), tmp_path, steps=6,
                      resume=str(tmp_path / "checkpoint-4"))


def test_trainer_resume_refuses_another_runs_checkpoint_of_the_same_step(tmp_path):
    """The callback read the adapter from output_dir/checkpoint-<step>: resuming run X's checkpoint with output_dir
    set to run Y's folder (which has a checkpoint of that step too) silently loaded Y's adapter under X's classifier."""
    cfg = hl.HeartLoRAConfig(targets=("q", "v"), rank=2)
    _train_saving(hl.attach(_model(), cfg), HeartLoRACallback(warmup_steps=1, ne=3), tmp_path / "X", steps=4)
    _train_saving(hl.attach(_model(), cfg), HeartLoRACallback(warmup_steps=1, ne=3), tmp_path / "Y", steps=4,
                  learning_rate=1e-1)
    with pytest.raises(ConfigError, match="is not the checkpoint being resumed: its classifier differs"):
        _train_saving(hl.attach(_model(), cfg), HeartLoRACallback(warmup_steps=1, ne=3), tmp_path / "Y", steps=6,
                      resume=str(tmp_path / "X" / "checkpoint-4"))


BEST = {"eval_strategy": "steps", "eval_steps": 2, "load_best_model_at_end": True, "metric_for_best_model": "loss",
        "greater_is_better": True}  # the worst loss "best": an early checkpoint, not the last step's


def test_load_best_model_at_end_brings_back_the_best_checkpoints_adapter_too(tmp_path):
    """The Trainer put back the best checkpoint's classifier only: the model was that classifier on the last step's
    adapter, equal to no checkpoint. Now it is the best checkpoint's model exactly."""
    cfg = hl.HeartLoRAConfig(targets=("q", "v"), rank=2)
    model = hl.attach(_model(), cfg)
    cb = HeartLoRACallback(warmup_steps=1, ne=3)
    trainer = _train_saving(model, cb, tmp_path, steps=8, **BEST)
    best = trainer.state.best_model_checkpoint
    assert best and not best.endswith("checkpoint-8")  # else the test could not tell best from last
    torch.testing.assert_close(_logits(model), _logits(hl.load_adapter(best)), atol=1e-6, rtol=0)
    assert not torch.allclose(_logits(model), _logits(hl.load_adapter(tmp_path / "checkpoint-8")), atol=1e-4)
    assert sorted(cb.heads_off) == sorted((n, h) for n, m in hl.head_masks(model).items()
                                          for h, on in enumerate(m) if not on)
    # a train end where the Trainer did not put the best model back (an Optuna trial it prunes calls on_train_end
    # first): the classifier is not the best checkpoint's, so the adapter is left as it is, and nothing is raised
    with torch.no_grad():
        for p in hl.adapter_parameters(model):
            p.add_(0.5)
        model.classifier.weight.add_(0.5)
    before = _logits(model)
    cb.on_train_end(trainer.args, trainer.state, trainer.control, model=model)
    torch.testing.assert_close(_logits(model), before, atol=0, rtol=0)


def test_load_best_model_at_end_refuses_a_best_checkpoint_from_before_the_heads_went_off(tmp_path):
    cfg = hl.HeartLoRAConfig(targets=("q", "v"), rank=2)
    # the lowest eval loss of this run is step 2's (1.103; steps 4 to 8: 1.13 to 1.14), before the switch at step 3
    with pytest.raises(ConfigError, match=r"best checkpoint \(.*checkpoint-2\) was saved before the heads were "
                                          "switched off at step 3"):
        _train_saving(hl.attach(_model(), cfg), HeartLoRACallback(warmup_steps=3, ne=3), tmp_path, steps=8,
                      **{**BEST, "greater_is_better": False})


def test_a_plain_state_dict_loads_into_the_adapted_model_keeping_the_adapters():
    from heartlora.integrations.hf_trainer import base_state_dict

    model = hl.attach(_model(), hl.HeartLoRAConfig(targets=("q", "v"), rank=2))
    with torch.no_grad():
        for p in hl.adapter_parameters(model):
            p.normal_()
    before = _logits(model)
    plain = base_state_dict(model)
    assert set(plain) == set(_model().state_dict())
    model.load_state_dict(plain, strict=True)
    torch.testing.assert_close(_logits(model), before, atol=0, rtol=0)


def test_a_trainer_folder_whose_config_json_was_edited_is_refused(tmp_path):
    """load_adapter(DIR) builds the backbone from the folder's config.json, and the weights' fingerprint does not see
    a setting such as layer_norm_eps or hidden_act: the adapter file keeps the config it was trained with."""
    import json

    from heartlora.errors import AdapterFileError

    model = hl.attach(_model(), hl.HeartLoRAConfig(targets=("q", "v"), rank=2))
    trainer = _train_saving(model, HeartLoRACallback(warmup_steps=2, ne=3), tmp_path / "run")
    final = tmp_path / "final"
    trainer.save_model(str(final))
    torch.testing.assert_close(_logits(hl.load_adapter(final)), _logits(model), atol=1e-6, rtol=0)
    config = json.loads((final / "config.json").read_text())
    for key, value in (("layer_norm_eps", 0.5), ("hidden_act", "relu")):
        edited = {**config, key: value}
        (final / "config.json").write_text(json.dumps(edited))
        with pytest.raises(AdapterFileError, match=rf"config\.json is not the config the adapter was trained with "
                                                   rf"\({key}: {value!r} there"):
            hl.load_adapter(final)


def test_callback_refuses_a_trainer_in_several_processes(tmp_path):
    """Under DDP the Trainer's wrapper keeps the Parameters it was built with: the factors rebuilt when heads go off
    would train apart in each process (two gloo processes ended with different adapters), so it is refused."""
    from types import SimpleNamespace

    model = hl.attach(_model(), hl.HeartLoRAConfig(targets=("q", "v"), rank=2))
    cb = HeartLoRACallback(warmup_steps=2, ne=3)
    state = SimpleNamespace(max_steps=5, global_step=0)
    with pytest.raises(ConfigError, match=r"^HeartLoRACallback runs in one process, and this Trainer runs 2 \(DDP\)"):
        cb.on_train_begin(SimpleNamespace(world_size=2, seed=0), state, None, model=model)
    cb.on_train_begin(SimpleNamespace(world_size=1, seed=0), state, None, model=model)
    assert cb.tracker is not None and cb.tracker.steps == 0
