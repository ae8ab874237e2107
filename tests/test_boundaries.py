"""Boundaries that show: no module imports another module's private names, comments point at files in the
repository, and loading a trained model leaves the caller's random stream alone."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import torch

import heartlora as hl
from heartlora.backbones import create_backbone
from heartlora.engine import load_trained
from heartlora.engine.inference import RUN_KEY, build_backbone

SRC = Path(hl.__file__).resolve().parent
ROOT = SRC.parents[1]


def test_no_module_imports_another_modules_private_names():
    found = []
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("heartlora"):
                found += [f"{path.relative_to(SRC)}: {node.module}.{a.name}" for a in node.names
                          if a.name.startswith("_") and not a.name.startswith("__")]
    assert found == []


def test_comments_cite_files_in_the_repository():
    """No "SPEC §n" of a file outside the repository; every docs/… page a source file names exists."""
    for path in sorted(SRC.rglob("*.py")):
        text = path.read_text()
        assert not re.search(r"\bSPEC\b", text), path
        for page in re.findall(r"\b((?:docs|benchmarks)/[\w/.-]+\.md)\b", text):
            assert (ROOT / page).is_file(), f"{path.relative_to(SRC)} names {page}, which does not exist"


def test_loading_a_trained_model_leaves_the_callers_random_stream_alone(tmp_path: Path):
    """build_backbone seeds its own fork of the CPU generator: the backbone's random weights match the run's (the
    fingerprint check passes) and the caller's next draws are those it would have made without the load."""
    torch.manual_seed(5)
    model = create_backbone("test_vit", num_classes=3, img_size=32, pretrained=False)
    hl.attach(model, hl.HeartLoRAConfig(targets=("q", "v"), rank=2))
    run = {"backbone_spec": dict(model.spec), "pretrained": False, "init_seed": 5}
    hl.save_adapter(model, tmp_path / "adapter.safetensors", extra_metadata={RUN_KEY: run})
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    loaded, _ = load_trained(tmp_path / "adapter.safetensors")
    assert torch.equal(torch.get_rng_state(), state)
    build_backbone(run)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(torch.rand(4), expected)
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(loaded(x), model.eval()(x))


def test_row_checks_leave_the_callers_random_stream_alone():
    from conftest import make_family

    from heartlora.backbones.probe import row_checks

    model, x = make_family("timm_vit")
    hl.attach(model, hl.HeartLoRAConfig(targets=("q", "v"), rank=2))
    torch.manual_seed(7)
    state = torch.get_rng_state()
    assert all(r == {"qk": "ok", "v": "ok"} or set(r.values()) == {"ok"} for r in row_checks(model, x).values())
    assert torch.equal(torch.get_rng_state(), state)
