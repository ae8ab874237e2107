"""The Python example in docs/API.md runs as written and prints what it says."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "API.md"


def test_api_example_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = re.search(r"```python\n(.*?)```", DOC.read_text(), re.S).group(1)
    exec(compile(code.replace("/tmp/task.safetensors", str(tmp_path / "task.safetensors")), str(DOC), "exec"), {})
    lines = capsys.readouterr().out.splitlines()
    adapter_bytes, on, total = map(int, lines[1].split())
    assert (on, total) == (24, 36)
    # all on: 12 layers × (q, v) × (A 8×192 + B 192×8) floats; each head off saves 64×8 floats of q and of v
    # a layer whose heads are all off drops its shared A factors (8×192 of q and of v) too: whole A pairs only
    saved = 294_912 - 12 * 2 * 64 * 8 * 4 - adapter_bytes
    assert saved >= 0 and saved % (2 * 8 * 192 * 4) == 0 and saved <= 4 * 2 * 8 * 192 * 4


def test_every_public_name_resolves() -> None:
    """Each name ``heartlora`` exports loads from the module its lazy table names (a wrong entry would only fail when
    a user first touched that name); API.md's "a new family is one register_layout(HeadLayout(...)) call" included."""
    import heartlora

    assert {"register_layout", "HeadLayout"} <= set(heartlora.__all__)
    for name in heartlora.__all__:
        assert getattr(heartlora, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        heartlora.not_a_name  # noqa: B018


def test_api_guide_rows_name_real_signatures() -> None:
    """Each row of API.md's reference tables names an ``hl`` attribute whose parameters include every name the row
    shows (``set_adapters_enabled(model, flag)`` once named a parameter that does not exist)."""
    import inspect

    import heartlora

    rows = re.findall(r"^\| `(\w+)\(([^)]*)\)`", (DOC.parent / "API.md").read_text(), re.M)
    assert len(rows) >= 20
    for name, args in rows:
        params = inspect.signature(getattr(heartlora, name)).parameters
        shown = [a.split("=")[0].strip() for a in args.split(",") if a.strip() not in ("", "*", "…", "...")]
        assert all(a in params for a in shown if a != "…"), (name, shown, list(params))


@pytest.mark.slow
def test_the_site_builds_strictly_and_documents_every_public_name(tmp_path: Path) -> None:
    """`make docs`: mkdocs with --strict (a broken link, a missing page or a docstring that does not parse fails it);
    every name ``import heartlora`` exports has its entry in the generated reference of the module defining it, and
    no page of the site links to a commit, a GitHub issue or a file outside the repository."""
    import subprocess
    import sys

    import heartlora

    pytest.importorskip("mkdocstrings")
    root = DOC.parents[1]
    site = tmp_path / "site"
    build = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(site)], cwd=root,
                           capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-3000:]
    for name, module in heartlora._LAZY.items():
        page = site / "reference" / module.split(".")[1] / "index.html"
        assert f'id="{module}.{name}"' in page.read_text(), f"{module}.{name} has no entry in the API reference"
    for name in ("ConfigError", "HeartLoRAError", "AdapterFileError"):
        assert f'id="heartlora.errors.{name}"' in (site / "reference" / "errors" / "index.html").read_text()


def test_readme_is_a_front_page() -> None:
    """The README stays short (≤ 10 KB), keeps its two set-up commands first and carries no issue numbers or commit
    hashes (the history of figures belongs in docs/research/)."""
    readme = (DOC.parents[1] / "README.md").read_text()
    assert len(readme.encode()) <= 10_240
    first_code = re.search(r"```bash\n(.*?)```", readme, re.S).group(1)
    assert [line.split()[:2] for line in first_code.splitlines()] == [["make", "demo"], ["make", "test"]]
    assert not re.search(r"\bissue \d+|#\d{2,}\b|\bcommit [0-9a-f]{7}", readme)
