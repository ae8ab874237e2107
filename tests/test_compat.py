"""The supported version ranges: pyproject.toml's lower bounds are what the compatibility stage of CI installs, the
project's pins lie inside them, the running environment satisfies them, and PEFT (the optional extra) attaches to the
Hugging Face backbones of the installed transformers. `.ci/run` runs this file in the oldest supported environment too.
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement
from packaging.version import Version

from conftest import make_family

tomllib = pytest.importorskip("tomllib")  # Python 3.11+; the library itself supports 3.10
ROOT = Path(__file__).resolve().parents[1]


def declared() -> dict[str, Requirement]:
    """Every requirement of pyproject.toml (dependencies and extras) by normalised name."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    return {Requirement(line).name.lower(): Requirement(line) for line in lines}


def pins(name: str) -> dict[str, Version]:
    """The ``name==version`` lines of a constraints file, comments and blank lines skipped."""
    out = {}
    for line in (ROOT / name).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            requirement = Requirement(line)
            (spec,) = requirement.specifier
            assert spec.operator == "==", f"{name}: {line!r} is not an exact pin"
            out[requirement.name.lower()] = Version(spec.version)
    return out


def lower_bound(requirement: Requirement) -> Version | None:
    found = [Version(s.version) for s in requirement.specifier if s.operator == ">="]
    return found[0] if found else None


def test_library_requirements_are_ranges_not_pins():
    for name, requirement in declared().items():
        assert not any(s.operator == "==" for s in requirement.specifier), f"{name} is pinned in pyproject.toml"


def test_project_pins_lie_inside_the_declared_ranges():
    ranges = declared()
    for name, version in pins("constraints.txt").items():
        if name in ranges:
            assert ranges[name].specifier.contains(version, prereleases=True), f"constraints.txt {name}=={version}"
    assert {"torch", "torchvision", "timm", "transformers", "peft"} <= set(pins("constraints.txt"))


def test_oldest_environment_is_the_declared_lower_bounds():
    """constraints-oldest.txt (what CI's compatibility stage installs) pins each of these at its declared minimum,
    so the minimum in pyproject.toml is a version that CI runs."""
    ranges = declared()
    oldest = pins("constraints-oldest.txt")
    for name in ("timm", "transformers", "peft", "safetensors", "onnx"):
        assert lower_bound(ranges[name]) == oldest[name], f"{name}: pyproject {ranges[name]}, CI runs {oldest[name]}"


def test_running_environment_satisfies_the_ranges():
    for name in ("torch", "torchvision", "timm", "transformers", "safetensors", "onnx", "peft"):
        try:
            installed = Version(metadata.version(name))
        except metadata.PackageNotFoundError:
            continue
        assert declared()[name].specifier.contains(installed, prereleases=True), f"{name} {installed} installed"


@pytest.mark.parametrize("family_name", ["hf_vit", "hf_dinov2"])
def test_peft_lora_attaches_to_the_installed_transformers(family_name: str):
    """The PEFT baseline finds q and v of every layer under either attention naming (query/value or q_proj/v_proj),
    its zero-initialised B leaves the output alone, a trained B changes it, and merging keeps it."""
    pytest.importorskip("peft")
    from heartlora_bench.peft_lora import peft_model

    model, x = make_family(family_name)
    with torch.no_grad():
        before = model(x)
    wrapped = peft_model(model, ("q", "v"), rank=2, scale=1.0).eval()
    lora = {name for name, module in wrapped.named_modules() if hasattr(module, "lora_A") and module.lora_A}
    assert len(lora) == 2 * 2  # two layers, q and v
    with torch.no_grad():
        assert torch.allclose(wrapped(x), before, atol=1e-6)
        for name, param in wrapped.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
        adapted = wrapped(x)
        assert not torch.allclose(adapted, before, atol=1e-3)
        merged = wrapped.merge_and_unload()
        assert torch.allclose(merged(x), adapted, atol=1e-5)
