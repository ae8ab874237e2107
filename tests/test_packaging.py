"""What the heartlora wheel holds (the library and its command, no research code), how the command finds methods
that other packages install (the ``heartlora.methods`` entry point), and that every suite profile's commands run."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_wheel_holds_the_library_and_cli_only(tmp_path: Path) -> None:
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                            str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=600,
                           env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = tmp_path.glob("heartlora-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"heartlora", next(t for t in tops if t.endswith(".dist-info"))}
    assert "heartlora/cli/main.py" in names and "heartlora/method/model.py" in names
    research = [n for n in names if any(k in n for k in ("experiments", "heartlora_bench", "benchmarks", "suite"))]
    assert not research, research
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "heartlora = heartlora.cli.main:main" in zipfile.ZipFile(wheel).read(entry).decode()


def test_the_library_never_imports_the_research_package() -> None:
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "src").rglob("*.py")
                 if "heartlora_bench" in p.read_text() or "heartlora.experiments" in p.read_text()]
    assert not offenders


class _Entry:
    def __init__(self, name: str, obj: object, dist: str = "some-plugin") -> None:
        self.name, self._obj, self.value = name, obj, f"plugin:{name}"
        self.dist = type("D", (), {"name": dist})()

    def load(self) -> object:
        if isinstance(self._obj, Exception):
            raise self._obj
        return self._obj


def test_an_installed_method_is_found_by_name_and_a_broken_one_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    from heartlora.engine import training_methods as methods
    from heartlora.errors import ConfigError

    class Plug(methods.TrainingMethod):
        description = "a plug-in"

    entries = [_Entry("plug-class", Plug), _Entry("plug-broken", ImportError("no module named zzz")),
               _Entry("plug-wrong", object())]
    monkeypatch.setattr(methods, "entry_points", lambda group: entries if group == "heartlora.methods" else [])
    monkeypatch.setattr(methods, "_REGISTRY", dict(methods._REGISTRY))
    assert {"plug-class", "plug-broken", "plug-wrong"} <= set(methods.method_names())  # listed, not loaded
    got = methods.get_method("plug-class")
    assert isinstance(got, Plug) and got.name == "plug-class" and methods.get_method("plug-class") is got
    with pytest.raises(ConfigError, match="plug-broken.*some-plugin failed to load.*no module named zzz"):
        methods.get_method("plug-broken")
    with pytest.raises(ConfigError, match="not a heartlora TrainingMethod"):
        methods.get_method("plug-wrong")
    with pytest.raises(ConfigError, match="unknown method 'nope'.*plug-class"):
        methods.get_method("nope")


@pytest.mark.slow
@pytest.mark.parametrize("profile", ["smoke", "quick"])
def test_each_smoke_profile_runs_its_peft_baseline_command_end_to_end(profile: str, tmp_path: Path) -> None:
    """The suite's own command line for ``peft-lora`` (the method that lives outside the library) on the profile's
    first task: `heartlora train --method peft-lora` finds it through the entry point and finishes."""
    pytest.importorskip("peft")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        suite = importlib.import_module("suite")
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    prof = suite.PROFILES[profile]
    assert "peft-lora" in prof.methods
    out = tmp_path / "run"
    cmd = suite.run_command(prof, "val", "digits", "peft-lora", {}, prof.seeds[0], out, "cpu", 1)
    assert cmd[1:5] == ["-m", "heartlora", "train", "--method"] and cmd[5] == "peft-lora"
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, (done.stdout + done.stderr)[-2000:]
    assert (out / "metrics.json").is_file() and '"method": "peft-lora"' in (out / "metrics.json").read_text()
