"""Which backbone families heartlora adapts, on which rows: writes docs/BACKBONES.md.

For each family (random weights, small sizes): build it, ``attach`` (which itself checks that every adapted
projection gets a gradient and changes its attention's output), then run the row-placement checks of
heartlora.backbones.probe on the first adapted layer. Minutes on one core:

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/backbones.py
"""

from __future__ import annotations

import argparse
import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import heartlora as hl
from heartlora.backbones.probe import row_checks

# timm families: (model name, extra create_model arguments, input size)
TIMM: list[tuple[str, dict[str, Any], int]] = [
    ("vit_tiny_patch16_224", {"img_size": 32, "depth": 2}, 32),
    ("deit_tiny_patch16_224", {"img_size": 32, "depth": 2}, 32),
    ("deit_tiny_distilled_patch16_224", {"img_size": 32, "depth": 2}, 32),
    ("deit3_small_patch16_224", {"img_size": 32, "depth": 2}, 32),
    ("vit_small_patch14_dinov2", {"img_size": 28, "depth": 2}, 28),
    ("vit_small_patch14_reg4_dinov2", {"img_size": 28, "depth": 2}, 28),
    ("flexivit_small", {"img_size": 32, "depth": 2}, 32),
    ("vit_base_patch16_siglip_224", {"img_size": 32, "depth": 2}, 32),
    ("vit_pe_core_tiny_patch16_384", {"img_size": 32, "depth": 2}, 32),
    ("vit_relpos_small_patch16_224", {"img_size": 32, "depth": 2}, 32),
    ("samvit_base_patch16_224", {"img_size": 64, "depth": 2}, 64),
    ("vit_small_r26_s32_224", {"img_size": 64}, 64),
    ("eva02_tiny_patch14_224", {"img_size": 28, "depth": 2}, 28),
    ("eva_giant_patch14_224", {"img_size": 28, "depth": 1}, 28),
    ("vit_small_patch16_dinov3_qkvb", {"img_size": 32, "depth": 2}, 32),
    ("beit_base_patch16_224", {"img_size": 32, "depth": 2}, 32),
    ("beitv2_base_patch16_224", {"img_size": 32, "depth": 2}, 32),
    ("swin_tiny_patch4_window7_224", {"img_size": 56, "window_size": 7, "depths": (1, 1, 1, 1)}, 56),
    ("swinv2_tiny_window8_256", {"img_size": 64, "window_size": 4, "depths": (1, 1, 1, 1)}, 64),
    ("swinv2_cr_tiny_224", {"img_size": 64, "window_size": 4, "depths": (1, 1, 1, 1)}, 64),
    ("cait_xxs24_224", {"img_size": 32, "depth": 2}, 32),
    ("xcit_nano_12_p16_224", {"img_size": 32, "depth": 2}, 32),
    ("convit_tiny", {"img_size": 32, "depth": 2}, 32),
    ("crossvit_tiny_240", {}, 240),
    ("volo_d1_224", {"img_size": 64}, 64),
    ("twins_svt_small", {"img_size": 64, "depths": (1, 1, 1, 1)}, 64),
    ("twins_pcpvt_small", {"img_size": 64, "depths": (1, 1, 1, 1)}, 64),
    ("pvt_v2_b0", {}, 64),
    ("tiny_vit_5m_224", {}, 224),
    ("efficientformer_l1", {}, 224),
    ("efficientformerv2_s0", {}, 224),
    ("maxvit_rmlp_pico_rw_256", {"img_size": 64}, 64),
    ("maxxvitv2_nano_rw_256", {"img_size": 64}, 64),
    ("coatnet_nano_rw_224", {"img_size": 64}, 64),
    ("maxvit_tiny_tf_224", {"img_size": 64}, 64),
    ("gcvit_xxtiny", {"img_size": 64}, 64),
    ("mvitv2_tiny", {"img_size": 64}, 64),
    ("coat_lite_tiny", {"img_size": 64}, 64),
    ("coat_tiny", {"img_size": 64}, 64),
    ("fastvit_sa12", {}, 64),
    ("davit_tiny", {"depths": (1, 1, 1, 1)}, 64),
    ("nest_tiny", {"img_size": 64}, 64),
    ("pit_ti_224", {"img_size": 64}, 64),
    ("tnt_s_patch16_224", {"img_size": 32}, 32),
    ("hiera_tiny_224", {}, 224),
    ("sam2_hiera_tiny", {}, 64),
    ("caformer_s18", {}, 64),
    ("edgenext_xx_small", {}, 64),
    ("levit_128s", {}, 224),
    ("efficientvit_b0", {}, 64),
    ("efficientvit_m0", {}, 224),
    ("nextvit_small", {}, 64),
    ("visformer_tiny", {}, 224),
    ("botnet26t_256", {"img_size": 64}, 64),
    ("halonet26t", {"img_size": 64}, 64),
    ("mobilevit_xxs", {}, 64),
    ("vitamin_small_224", {"img_size": 64}, 64),
    ("csatv2", {}, 64),
    ("swiftformer_xs", {}, 64),
    ("resnet18", {}, 32),
]

HF_COMMON = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}


def _hf(config_name: str, model_name: str, **kw: Any) -> Callable[[], tuple[torch.nn.Module, int]]:
    def build() -> tuple[torch.nn.Module, int]:
        import transformers as T
        args = {k: v for k, v in {**HF_COMMON, "image_size": 32, "patch_size": 8, **kw}.items() if v is not None}
        return getattr(T, model_name)(getattr(T, config_name)(**args)), int(args["image_size"])
    return build


HF = {
    "HF ViT": _hf("ViTConfig", "ViTModel"), "HF DeiT": _hf("DeiTConfig", "DeiTModel"),
    "HF DINOv2": _hf("Dinov2Config", "Dinov2Model"),
    "HF DINOv2 registers": _hf("Dinov2WithRegistersConfig", "Dinov2WithRegistersModel"),
    "HF BEiT": _hf("BeitConfig", "BeitModel"), "HF Data2VecVision": _hf("Data2VecVisionConfig", "Data2VecVisionModel"),
    "HF ViTMAE": _hf("ViTMAEConfig", "ViTMAEModel", mask_ratio=0.0), "HF ViTMSN": _hf("ViTMSNConfig", "ViTMSNModel"),
    "HF IJepa": _hf("IJepaConfig", "IJepaModel"),
    "HF CLIPVision": _hf("CLIPVisionConfig", "CLIPVisionModel"),
    "HF SiglipVision": _hf("SiglipVisionConfig", "SiglipVisionModel"),
    "HF Aimv2Vision": _hf("Aimv2VisionConfig", "Aimv2VisionModel"),
    "HF Swin": _hf("SwinConfig", "SwinModel", embed_dim=16, depths=[1, 1], num_heads=[2, 4], window_size=2,
                   patch_size=4, hidden_size=None, num_hidden_layers=None, num_attention_heads=None),
    "HF Swinv2": _hf("Swinv2Config", "Swinv2Model", embed_dim=16, depths=[1, 1], num_heads=[2, 4], window_size=2,
                     patch_size=4, hidden_size=None, num_hidden_layers=None, num_attention_heads=None),
}


def _torchvision() -> tuple[torch.nn.Module, int]:
    from torchvision.models import VisionTransformer
    return VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=32, mlp_dim=64), 32


def probe(build: Callable[[], tuple[torch.nn.Module, int]]) -> dict[str, Any]:
    t0 = time.time()
    try:
        model, size = build()
    except Exception as e:  # noqa: BLE001  (a family this timm/transformers cannot build at this size: not heartlora's verdict)
        return {"outcome": "not built", "detail": f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"}
    model.eval()
    x = torch.rand(1, 3, size, size)
    try:
        hl.attach(model, hl.HeartLoRAConfig(targets=("q", "k", "v", "o"), rank=2), example_input=x)
    except hl.HeartLoRAError as e:
        return {"outcome": "refused", "detail": str(e).splitlines()[0][:300], "seconds": time.time() - t0}
    cov = hl.coverage(model)
    first = hl.attention_layers(model)[0].name
    checks = row_checks(model, x, layers=[first], heads=(0,))[first]
    wrong = {k: v for k, v in checks.items() if v != "ok" and not v.startswith("n/a")}
    outcome = "adapted" if not cov.unadapted and not cov.partial else "partly adapted"
    return {"outcome": outcome, "layouts": sorted(set(cov.layouts.values())), "summary": cov.summary(),
            "rows": "ok" if not wrong else "; ".join(f"{k}: {v}" for k, v in wrong.items()),
            "seconds": time.time() - t0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/BACKBONES.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    import timm
    import transformers

    families: list[tuple[str, Callable[[], tuple[torch.nn.Module, int]]]] = []
    for name, kw, size in TIMM:
        families.append((f"timm {name}", lambda name=name, kw=kw, size=size: (
            timm.create_model(name, pretrained=False, num_classes=10, **kw), size)))
    families += list(HF.items()) + [("torchvision ViT", _torchvision)]
    rows = []
    for label, build in families:
        torch.manual_seed(0)
        r = probe(build)
        print(f"{label}: {r['outcome']} {r.get('rows', '')} {r.get('summary', r.get('detail', ''))}", flush=True)
        rows.append((label, r))
    counts: dict[str, int] = {}
    for _, r in rows:
        counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
    wrong = sum(1 for _, r in rows if r.get("rows", "ok") != "ok")
    lines = [
        "# Backbones heartlora adapts",
        "",
        ("Made by `OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/backbones.py` (random weights, small sizes; "
         f"timm {timm.__version__}, transformers {transformers.__version__}, torch {torch.__version__})."),
        ("Each family is built, adapted on q, k, v, o with `attach` (which fails loudly unless every adapted "
         "projection gets a gradient and changes its attention's output: no silent no-op can pass), and its first "
         "adapted layer is row-checked (heartlora/backbones/probe.py): `qk` = q rows × 2 and k rows × ½ leave the "
         "output unchanged, `v` = the output is affine in v's rows, `vo` = v rows × 2 and o columns × ½ leave it "
         "unchanged. A `qk` failure is expected where the family also uses q in a relative-position term "
         "(CoaT's convolutional position term multiplies q) or pools v through a LayerNorm (MViTv2); there the "
         "family's source was read instead. `n/a` = the family normalises q and k (SwinV2, XCiT), so scaling "
         "cannot show anything."),
        "",
        "Counts: " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) + f"; row checks failing: {wrong}.",
        "",
        "| family | outcome | layouts | row checks | coverage / reason |",
        "|---|---|---|---|---|",
    ]
    for label, r in rows:
        detail = r.get("summary", r.get("detail", "")).replace("|", "/")
        lines.append(f"| {label} | {r['outcome']} | {', '.join(r.get('layouts', []))} | {r.get('rows', '')} | "
                     f"{detail} |")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}: {counts}, row checks failing: {wrong}")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
