"""--compile and --precision: compiled and eager agree on outputs and gradients; precision resolution per device."""

from __future__ import annotations

import pytest
import torch

from heartlora.engine.precision import compiled, resolve_precision
from heartlora.errors import ConfigError


def _tiny_adapted() -> torch.nn.Module:
    from heartlora.backbones import create_backbone
    from heartlora.method import HeartLoRAConfig, attach, deactivate_heads

    torch.manual_seed(0)
    model = create_backbone("test_vit", num_classes=4, img_size=32, pretrained=False, drop_path=0.0)
    attach(model, HeartLoRAConfig(targets=("q", "v"), rank=4))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.1)  # B starts at zero: give the adapters an effect to compare
    deactivate_heads(model, heads=[("backbone.blocks.1.attn", 0)])
    return model


def test_compiled_and_eager_outputs_and_gradients_agree() -> None:
    """Dynamo captures the adapted model whole (heads off included) and AOTAutograd's backward matches eager. The
    ``aot_eager`` backend runs the captured graphs without generating C++ (inductor takes minutes on this CPU);
    code generation itself is torch's to test."""
    model = _tiny_adapted()
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))

    def run(net: torch.nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        out = net(x)
        out.square().sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    eager_out, eager_grads = run(model)
    torch._dynamo.reset()
    compiled_out, compiled_grads = run(compiled(model, True, backend="aot_eager"))
    torch.testing.assert_close(compiled_out, eager_out, rtol=1e-4, atol=1e-5)
    assert compiled_grads.keys() == eager_grads.keys() and any("lora_A" in n for n in eager_grads)
    for name in eager_grads:
        torch.testing.assert_close(compiled_grads[name], eager_grads[name], rtol=1e-3, atol=1e-5)
    assert compiled(model, False) is model


def test_precision_per_device() -> None:
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu).name == "fp32"  # CPU autocast is slower than fp32 on most CPUs
    bf16 = resolve_precision("bf16", cpu)
    with bf16.autocast():
        y = torch.nn.functional.linear(torch.ones(2, 3), torch.ones(4, 3))
    assert y.dtype == torch.bfloat16 and bf16.scaler is None
    with pytest.raises(ConfigError, match="fp16 needs a CUDA GPU"):
        resolve_precision("fp16", cpu)
    tf32 = resolve_precision("tf32", cpu)  # fp32 weights and products, no autocast; TF32 only on CUDA
    with tf32.autocast():
        y = torch.nn.functional.linear(torch.ones(2, 3), torch.ones(4, 3))
    assert y.dtype == torch.float32 and not tf32.tf32 and not resolve_precision("fp32", cpu).tf32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_precision_on_cuda() -> None:
    gpu = torch.device("cuda")
    assert resolve_precision("auto", gpu).name == ("bf16" if torch.cuda.is_bf16_supported() else "fp32")
    assert resolve_precision("fp16", gpu).scaler is not None
    assert resolve_precision("tf32", gpu).tf32 and not resolve_precision("fp32", gpu).tf32


def test_bf16_training_keeps_fp32_weights_and_the_same_stored_bytes(tmp_path, task: str) -> None:  # noqa: F811
    from safetensors.torch import load_file

    from heartlora.engine import TrainConfig, train

    kw = {"task": task, "backbone": "test_vit", "pretrained": False, "img_size": 32, "batch_size": 32, "epochs": 1,
          "method": "heart-lora", "ne": 3, "progress": False}
    fp32 = train(TrainConfig(**kw, out=str(tmp_path / "fp32")))
    bf16 = train(TrainConfig(**kw, precision="bf16", out=str(tmp_path / "bf16")))
    assert (fp32["precision"], bf16["precision"]) == ("fp32", "bf16")
    assert bf16["adapter_bytes"] == fp32["adapter_bytes"]
    a, b = load_file(tmp_path / "fp32" / "adapter.safetensors"), load_file(tmp_path / "bf16" / "adapter.safetensors")
    assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and a[k].shape == b[k].shape for k in a)
    assert any(not torch.equal(a[k], b[k]) for k in a)  # autocast did run the products in bf16


def test_a_run_reports_its_accuracy_in_exact_fp32_as_eval_does(tmp_path, task: str, monkeypatch, capsys) -> None:
    """A bf16 run evaluates its epochs under autocast (a curve), but the accuracy it records is computed in exact
    fp32 (no autocast, no TF32), the numerics `heartlora eval` uses: the two commands give one number."""
    import json

    from heartlora.cli.main import main
    from heartlora.engine import TrainConfig, metrics as metrics_module, train

    seen: list[torch.dtype] = []
    real = metrics_module.predict_logits

    def spy(*args, **kwargs):
        seen.append(torch.nn.functional.linear(torch.ones(1, 2), torch.ones(1, 2)).dtype)  # autocast on, or not
        return real(*args, **kwargs)

    monkeypatch.setattr(metrics_module, "predict_logits", spy)
    out = tmp_path / "bf16"
    metrics = train(TrainConfig(task=task, backbone="test_vit", pretrained=False, img_size=32, batch_size=32,
                                epochs=2, method="heart-lora", ne=3, progress=False, precision="bf16", out=str(out)))
    assert metrics["precision"] == "bf16"
    assert seen == [torch.bfloat16, torch.bfloat16, torch.float32]  # two epochs' curve, then the reported one
    seen.clear()
    assert main(["eval", "--adapter", str(out), "--split", "val200", "--json", "--device", "cpu"]) == 0
    assert seen == [torch.float32]
    assert json.loads(capsys.readouterr().out)["accuracy"] == metrics["accuracy"]
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a caller's autocast region does not reach the evaluation
        from heartlora.engine.precision import exact_fp32

        with exact_fp32(torch.device("cpu")):
            assert torch.nn.functional.linear(torch.ones(1, 2), torch.ones(1, 2)).dtype == torch.float32
            assert torch.get_float32_matmul_precision() == "highest"


def test_a_run_resumed_where_its_precision_resolves_otherwise_says_so(tmp_path, task: str, monkeypatch) -> None:
    """--precision auto is fp32 on a CPU and bf16 on a GPU: a run stopped on one and resumed on the other goes on at
    the new precision; every epoch's history row names the precision it trained at, and train.log says what changed.
    (The GPU is simulated: auto resolves to bf16 for the resume.)"""
    from heartlora.engine import TrainConfig, train, trainer as trainer_module

    kw = {"task": task, "backbone": "test_vit", "pretrained": False, "img_size": 32, "batch_size": 32, "epochs": 3,
          "method": "lora", "progress": False, "out": str(tmp_path)}
    first = train(TrainConfig(**kw, stop_after_epoch=1))
    assert [h["precision"] for h in first["history"]] == ["fp32"]
    monkeypatch.setattr(trainer_module, "resolve_precision",
                        lambda name, device: resolve_precision("bf16" if name == "auto" else name, device))
    done = train(TrainConfig(out=str(tmp_path), resume=True, progress=False))
    assert [h["precision"] for h in done["history"]] == ["fp32", "bf16", "bf16"] and done["precision"] == "bf16"
    log = (tmp_path / "train.log").read_text()
    assert "the epochs from 2 train at precision bf16 (--precision auto), the first 1 trained at fp32" in log
