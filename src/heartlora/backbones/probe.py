"""Row-placement checks: are the rows a layout calls head h's q, k, v (and o's columns) really that head's?

Run on a copy of an adapted model, in float64, with every bias zeroed (so scaling a weight row scales the whole
projection). For a layer and a head h:

- ``qk``: q rows × c and k rows × 1/c leave the attention's output unchanged (q·k is unchanged), while q rows × c
  alone change it (else the check would prove nothing);
- ``v``: the output is affine in v's rows: f(0) - 2 f(1) + f(2) = 0 when D is added t times to them, and f(1) ≠ f(0);
- ``vo``: v rows × c and o's columns × 1/c leave the output unchanged.

Families that use q elsewhere too (relative-position terms in ViT-SAM, CoaT, MViTv2) fail ``qk`` by design: there the
family's source decides; ``v`` and ``vo`` are n/a where an activation sits between the heads and o (LeViT,
EfficientFormerV2). Used by the tests (tests/test_layouts.py) and benchmarks/backbones.py.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from heartlora.method.layer import HeadLoRALinear, HeadLoRAProjection
from heartlora.method.model import attention_layers, call_model, float_tensors, wrappers

C = 2.0
TOL = 1e-9  # float64: exact identities hold to ~1e-14
MOVES = 1e-7  # a change this large is real


def _wrapper_of(model: nn.Module, proj: HeadLoRAProjection) -> HeadLoRALinear:
    return next(w for w in wrappers(model) if any(p is proj for p in w.lora.values()))


def _zero_biases(model: nn.Module) -> None:
    with torch.no_grad():
        for mod in model.modules():
            for name, t in list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False)):
                # a BatchNorm's running mean is a bias too: it shifts each row after the projection
                if ("bias" in name or name == "running_mean") and t is not None and t.is_floating_point():
                    t.zero_()


def _act_before_o(attn: nn.Module) -> str | None:
    """The activation an attention module holds where it may apply it between its heads' output and o (timm LeViT
    ``proj.act``, EfficientFormerV2 ``act``), if any: v's rows then reach the output through it, so ``v`` and ``vo``
    cannot hold. Only a name: the checks run anyway, and a failure is n/a where this names an activation."""
    for act in (getattr(attn, "act", None), getattr(getattr(attn, "proj", None), "act", None)):
        if isinstance(act, nn.Module) and not isinstance(act, nn.Identity):
            return type(act).__name__
    return None


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / (b.abs().max() + 1e-30))


def row_checks(model: nn.Module, example_input: Any, layers: list[str] | None = None,
               heads: tuple[int, ...] = (0, -1)) -> dict[str, dict[str, str]]:
    """Layer name → {check: "ok" or what went wrong} for the adapted ``layers`` (all by default) of ``model``,
    which is left untouched (the checks run on a float64 copy), as is the caller's random stream (each forward
    reseeds, inside a fork of the generators)."""
    gpus = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=gpus):
        return _row_checks(model, example_input, layers, heads, gpus)


def _row_checks(model: nn.Module, example_input: Any, layers: list[str] | None, heads: tuple[int, ...],
                gpus: list[int]) -> dict[str, dict[str, str]]:
    model = copy.deepcopy(model).double().eval()
    _zero_biases(model)
    x = example_input.double() if isinstance(example_input, torch.Tensor) and example_input.is_floating_point() \
        else example_input
    results: dict[str, dict[str, str]] = {}
    g = torch.Generator().manual_seed(0)
    for layer in attention_layers(model):
        if layers is not None and layer.name not in layers:
            continue
        projs = layer.projections
        # o's output: affine in v and free of what follows o (BERT's residual LayerNorm); the module's without o
        module = _wrapper_of(model, projs["o"]) if "o" in projs else model.get_submodule(layer.name)
        seen: list[torch.Tensor] = []
        hook = module.register_forward_hook(
            lambda m, i, o, seen=seen: seen.extend(float_tensors(o)) if not seen else None)

        def out(seen: list[torch.Tensor] = seen) -> torch.Tensor:
            seen.clear()
            torch.default_generator.manual_seed(0)  # models that draw noise in their forward (ViTMAE's shuffle)
            for i in gpus:  # draw the same each time
                torch.cuda.default_generators[i].manual_seed(0)
            call_model(model, x)
            return torch.cat([t.detach().reshape(-1) for t in seen])

        w = {t: _wrapper_of(model, p).base_layer.weight for t, p in projs.items()}
        res: dict[str, str] = {}
        with torch.no_grad():
            base = out()
            for h in sorted({hh % layer.num_heads for hh in heads}):
                qn = getattr(model.get_submodule(layer.name), "q_norm", None)
                if "q" in projs and "k" in projs and isinstance(qn, nn.Module) and not isinstance(qn, nn.Identity):
                    res["qk"] = f"n/a (q, k normalised by {type(qn).__name__}: scaling q moves nothing)"
                elif "q" in projs and "k" in projs:
                    iq, ik = projs["q"].index[h], projs["k"].index[h]
                    keep = w["q"].clone(), w["k"].clone()
                    w["q"][iq] *= C
                    moved = _rel(out(), base)
                    w["k"][ik] /= C
                    err = _rel(out(), base)
                    w["q"].copy_(keep[0]), w["k"].copy_(keep[1])
                    res.setdefault("qk", "ok")
                    if err < TOL and moved <= MOVES and res["qk"] == "ok":
                        res["qk"] = "n/a (q, k normalised: scaling q moves nothing)"
                    elif err >= TOL:
                        res["qk"] = f"head {h}: q×c, k/c moved the output by {err:.1e} (q×c alone: {moved:.1e})"
                # an activation the module holds may sit between the heads and o (then v's checks cannot hold and
                # a failure says n/a) or elsewhere (PVTv2-li's, on the pooled keys' and values' input: they pass)
                act = _act_before_o(model.get_submodule(layer.name))
                na = f"n/a ({act} between the heads and o)" if act is not None else None
                if "v" in projs:
                    iv = projs["v"].index[h]
                    keep = w["v"].clone()
                    d = torch.randn(w["v"][iv].shape, generator=g, dtype=torch.float64) * w["v"].abs().mean()
                    f = []
                    for _ in range(3):
                        f.append(out())
                        w["v"][iv] += d
                    w["v"].copy_(keep)
                    curve, step = _rel(f[2] - f[1], f[1] - f[0]), _rel(f[1], f[0])
                    res.setdefault("v", "ok")
                    if not (curve < TOL and step > MOVES):
                        res["v"] = na or f"head {h}: not affine in its v rows (curvature {curve:.1e}, step {step:.1e})"
                    if "o" in projs:
                        io = projs["o"].index[h]
                        keep_o = w["o"].clone()
                        w["v"][iv] *= C
                        w["o"][:, io] /= C
                        err = _rel(out(), base)
                        w["v"].copy_(keep), w["o"].copy_(keep_o)
                        res.setdefault("vo", "ok")
                        if err >= TOL:
                            res["vo"] = na or f"head {h}: v×c, o/c moved the output by {err:.1e}"
        hook.remove()
        results[layer.name] = res
    return results
