"""Tiny random models of every attention family heartlora supports, shared by the tests."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Tiny models: one thread is faster than two (thread start-up dominates), and far faster on a busy machine.
torch.set_num_threads(1)


class HFClassifier(nn.Module):
    """A Hugging Face encoder with a linear head on the first token, returning logits."""

    def __init__(self, backbone: nn.Module, hidden: int, num_classes: int, text: bool = False) -> None:
        super().__init__()
        self.backbone, self.text = backbone, text
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.backbone(input_ids=x) if self.text else self.backbone(pixel_values=x)
        return self.head(out.last_hidden_state[:, 0])


def _timm_vit() -> nn.Module:
    import timm
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                             embed_dim=32, num_heads=4, num_classes=5)


def _timm_swin() -> nn.Module:
    import timm
    return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=32, window_size=2,
                             embed_dim=16, depths=(1, 1), num_heads=(2, 4), num_classes=5)


def _hf_vit() -> nn.Module:
    from transformers import ViTConfig, ViTModel
    cfg = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32,
                    patch_size=8, attn_implementation="eager")
    return HFClassifier(ViTModel(cfg, add_pooling_layer=False), 32, 5)


def _hf_dinov2() -> nn.Module:
    from transformers import Dinov2Config, Dinov2Model
    cfg = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                       image_size=32, patch_size=8, attn_implementation="eager")
    return HFClassifier(Dinov2Model(cfg), 32, 5)


def _bert() -> nn.Module:
    from transformers import BertConfig, BertModel
    cfg = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=16, attn_implementation="eager")
    return HFClassifier(BertModel(cfg, add_pooling_layer=False), 32, 5, text=True)


def _torchvision_vit() -> nn.Module:
    from torchvision.models import VisionTransformer
    return VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=32, mlp_dim=64,
                             num_classes=5)


def _image_input(seed: int = 0) -> torch.Tensor:
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _text_input(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 50, (3, 10), generator=torch.Generator().manual_seed(seed))


def _hf_layout() -> str:
    """transformers 5 names HF ViT/DINOv2 attention q_proj…o_proj; 4.x query/key/value + output.dense."""
    import transformers

    return "separate_qkvo" if int(transformers.__version__.split(".")[0]) >= 5 else "bert_style"


HF_LAYOUT = _hf_layout()

# name -> (factory, input maker, layout name)
FAMILIES = {
    "timm_vit": (_timm_vit, _image_input, "fused_qkv"),
    "timm_swin": (_timm_swin, _image_input, "fused_qkv"),
    "hf_vit": (_hf_vit, _image_input, HF_LAYOUT),
    "hf_dinov2": (_hf_dinov2, _image_input, HF_LAYOUT),
    "bert": (_bert, _text_input, "bert_style"),
    "torchvision_vit": (_torchvision_vit, _image_input, "torch_mha"),
}


def make_family(name: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    factory, inputs, _ = FAMILIES[name]
    torch.manual_seed(seed)
    model = factory().eval()
    return model, inputs()


@pytest.fixture(params=sorted(FAMILIES))
def family(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from a second thread, and on a busy machine the threads' barriers make them several
    times slower: every test runs on one thread, and a test that sets another count cannot leak it to the next."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def task(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny four-class VTAB-1K folder task (tests/tiny_task.py), written once and only read by the tests."""
    from tiny_task import write_tiny_vtab

    return write_tiny_vtab(tmp_path_factory.mktemp("tiny_task"))
