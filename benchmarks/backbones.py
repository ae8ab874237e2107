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
    ("levit_128s", {"depth": (1, 1, 1)}, 224),
    ("levit_conv_128s", {"depth": (1, 1, 1)}, 224),
    ("efficientvit_b0", {}, 64),
    ("efficientvit_m0", {}, 224),
    ("nextvit_small", {}, 64),
    ("visformer_tiny", {}, 224),
    ("botnet26t_256", {}, 256),
    ("halonet26t", {}, 256),
    ("mobilevit_xxs", {}, 64),
    ("vitamin_small_224", {"img_size": 64}, 64),
    ("csatv2", {}, 64),
    ("swiftformer_xs", {}, 64),
    ("vit_small_patch16_18x2_224", {"img_size": 32, "depth": 2}, 32),
    ("vit_base_patch16_clip_224", {"img_size": 32, "depth": 2}, 32),
    ("vit_base_patch16_siglip_gap_224", {"img_size": 32, "depth": 2}, 32),
    ("vit_medium_patch16_rope_reg1_gap_256", {"img_size": 32, "depth": 2}, 32),
    ("vit_small_patch16_rope_mixed_224", {"img_size": 32, "depth": 2}, 32),
    ("vit_small_patch16_dinov3", {"img_size": 32, "depth": 2}, 32),
    ("naflexvit_base_patch16_gap", {"img_size": 32, "depth": 2}, 32),
    ("vit_intern300m_patch14_448", {"img_size": 28, "depth": 2}, 28),
    ("aimv2_1b_patch14_224", {"img_size": 28, "depth": 2, "embed_dim": 64, "num_heads": 4}, 28),
    ("vit_srelpos_small_patch16_224", {"img_size": 32, "depth": 2}, 32),
    ("vit_pwee_patch16_reg1_gap_256", {"img_size": 32, "depth": 2}, 32),
    ("vit_base_patch16_xp_224", {"img_size": 32, "depth": 2}, 32),
    ("coatnext_nano_rw_224", {"img_size": 64}, 64),
    ("pvt_v2_b2_li", {"depths": (1, 1, 1, 1)}, 64),
    ("fastvit_mci0", {}, 64),
    ("mobilevitv2_050", {}, 64),
    ("shvit_s1", {}, 64),
    ("lambda_resnet26t", {"img_size": 64}, 64),
    ("resnet18", {}, 32),
]

HF_COMMON = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}


def _hf(config_name: str, model_name: str, **kw: Any) -> Callable[[], tuple[torch.nn.Module, int]]:
    def build() -> tuple[torch.nn.Module, int]:
        import transformers as T
        args = {k: v for k, v in {**HF_COMMON, "image_size": 32, "patch_size": 8, **kw}.items() if v is not None}
        size = args["image_size"]
        return getattr(T, model_name)(getattr(T, config_name)(**args)), int(size if isinstance(size, int) else size[0])
    return build


def _siglip2() -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """SigLIP2 (NaFlex) takes patchified pixels with a mask and each image's patch grid."""
    import transformers as T
    cfg = T.Siglip2VisionConfig(**HF_COMMON, patch_size=8, num_patches=16)
    x = {"pixel_values": torch.rand(1, 16, 3 * 8 * 8), "pixel_attention_mask": torch.ones(1, 16, dtype=torch.long),
         "spatial_shapes": torch.tensor([[4, 4]])}
    return T.Siglip2VisionModel(cfg), x


# two-stage pyramid encoders (PVT, PVTv2, Segformer)
_PYRAMID: dict[str, Any] = {"hidden_size": None, "num_hidden_layers": None, "intermediate_size": None,
                            "num_encoder_blocks": 2, "depths": [1, 1], "hidden_sizes": [16, 32], "strides": [4, 2],
                            "num_attention_heads": [1, 2], "mlp_ratios": [2, 2]}

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
    "HF DonutSwin": _hf("DonutSwinConfig", "DonutSwinModel", embed_dim=16, depths=[1, 1], num_heads=[2, 4],
                        window_size=2, patch_size=4, hidden_size=None, num_hidden_layers=None,
                        num_attention_heads=None),
    "HF DINOv3ViT": _hf("DINOv3ViTConfig", "DINOv3ViTModel"),
    "HF YOLOS": _hf("YolosConfig", "YolosModel", num_detection_tokens=2, image_size=[32, 32]),
    "HF VitDet": _hf("VitDetConfig", "VitDetModel", pretrain_image_size=32),
    "HF SAM vision": _hf("SamVisionConfig", "SamVisionModel", output_channels=16, global_attn_indexes=[1],
                         window_size=2, num_pos_feats=16, mlp_dim=64, intermediate_size=None),
    "HF BlipVision": _hf("BlipVisionConfig", "BlipVisionModel"),
    "HF Blip2Vision": _hf("Blip2VisionConfig", "Blip2VisionModel"),
    "HF InstructBlipVision": _hf("InstructBlipVisionConfig", "InstructBlipVisionModel"),
    "HF GitVision": _hf("GitVisionConfig", "GitVisionModel"),
    "HF ChineseCLIPVision": _hf("ChineseCLIPVisionConfig", "ChineseCLIPVisionModel"),
    "HF AltCLIPVision": _hf("AltCLIPVisionConfig", "AltCLIPVisionModel"),
    "HF MetaClip2Vision": _hf("MetaClip2VisionConfig", "MetaClip2VisionModel"),
    "HF OwlViTVision": _hf("OwlViTVisionConfig", "OwlViTVisionModel"),
    "HF Owlv2Vision": _hf("Owlv2VisionConfig", "Owlv2VisionModel"),
    "HF Siglip2Vision": _siglip2,
    "HF PixtralVision": _hf("PixtralVisionConfig", "PixtralVisionModel", head_dim=8),
    "HF PVT": _hf("PvtConfig", "PvtModel", **_PYRAMID, sequence_reduction_ratios=[2, 1], patch_sizes=[4, 2]),
    "HF PVTv2": _hf("PvtV2Config", "PvtV2Model", **_PYRAMID, sr_ratios=[2, 1], patch_sizes=[7, 3]),
    "HF Segformer": _hf("SegformerConfig", "SegformerModel", **_PYRAMID, sr_ratios=[2, 1], patch_sizes=[7, 3]),
}


def _torchvision() -> tuple[torch.nn.Module, int]:
    from torchvision.models import VisionTransformer
    return VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=32, mlp_dim=64), 32


def _trained_norms(model: torch.nn.Module, size: int) -> None:
    """Random init starts some BatchNorm weights at zero (the last norm of LeViT's residual branches), which silences
    the attention before it, and leaves running statistics that do not normalise anything, so deep BatchNorm
    families saturate their softmax. Trained weights have neither: zero weights are set to one and the running
    statistics are measured on one random batch, as training would leave them."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    with torch.no_grad():
        for m in norms:
            if m.weight is not None and not m.weight.any():
                m.weight.fill_(1.0)
            m.reset_running_stats()
            m.momentum = None  # a cumulative average: one batch sets the statistics
        model.train()
        model(torch.rand(4, 3, size, size, generator=torch.Generator().manual_seed(1)))
        model.eval()
        for m in norms:
            m.momentum = 0.1


def probe(build: Callable[[], tuple[torch.nn.Module, int]]) -> dict[str, Any]:
    t0 = time.time()
    try:
        model, size = build()
        x = torch.rand(1, 3, size, size) if isinstance(size, int) else size
        if isinstance(size, int):
            _trained_norms(model, size)
    except Exception as e:  # noqa: BLE001  (a family this timm/transformers cannot build at this size: not heartlora's verdict)
        return {"outcome": "not built", "detail": f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:120]}"}
    model.eval()
    try:
        hl.attach(model, hl.HeartLoRAConfig(targets=("q", "k", "v", "o"), rank=2), example_input=x)
    except hl.HeartLoRAError as e:
        return {"outcome": "refused", "detail": str(e).splitlines()[0][:300], "seconds": time.time() - t0}
    cov = hl.coverage(model)
    first = hl.attention_layers(model)[0].name
    checks = row_checks(model, x, layers=[first], heads=(0,))[first]
    wrong = {k: v for k, v in checks.items() if v != "ok" and not v.startswith("n/a")}
    unchecked = [k for k, v in checks.items() if v.startswith("n/a")]  # shown as n/a, not as a check that passed
    outcome = ("partly adapted" if cov.unadapted else "adapted, some projections absent" if cov.partial
               else "adapted")
    return {"outcome": outcome, "layouts": sorted(set(cov.layouts.values())), "summary": cov.summary(),
            "rows": "; ".join(f"{k}: {v}" for k, v in wrong.items()) if wrong
            else "ok" + (f" ({', '.join(unchecked)}: n/a)" if unchecked else ""),
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
    wrong = sum(1 for _, r in rows if not r.get("rows", "ok").startswith("ok"))
    every = sum(1 for _, r in rows if r["outcome"].startswith("adapted"))
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
         "(CoaT's convolutional position term multiplies q; BoTNet and HaloNet add a term computed from q) or pools "
         "v through a LayerNorm (MViTv2); there the family's source was read instead (tests/test_layouts.py checks "
         "BoTNet and HaloNet with that term zeroed). `ok (qk: n/a)` = v and vo passed, qk could not be checked: "
         "the family normalises q and k (SwinV2, XCiT, EdgeNeXt, `q_norm`), or scaling q alone moved the output "
         "too little at these random weights to show anything (the BLIP and SAM encoders, ViT-XP); "
         "`ok (v, vo: n/a)` = qk passed, v and vo could not be checked: the family puts an activation between the "
         "heads and o (LeViT, EfficientFormerV2; checked with the activation removed in "
         "tests/test_layouts.py)."),
        "",
        ("Outcomes: `adapted` = every attention module adapted on q, k, v, o; `adapted, some projections absent` = "
         "every attention module adapted, but the family has no Linear for some projection (named: BoTNet has no "
         "o of its own, GCViT's global q is made outside the attention); `partly adapted` = some attention "
         "modules left alone, each named with its reason at attach time; `refused` = attach raised a one-line "
         "error. BatchNorm families have their zero-initialised norm weights set to one and their running "
         "statistics measured on one random batch first, as training would leave them (an untrained LeViT's "
         "attention output is constant, which attach refuses to check)."),
        "",
        "Counts: " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) + f"; row checks failing: {wrong}.",
        f"Every attention module adapted: {every} of {len(rows)} families.",
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
