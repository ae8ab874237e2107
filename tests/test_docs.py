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
    assert adapter_bytes <= 294_912 - 12 * 2 * 64 * 8 * 4


def test_every_public_name_resolves() -> None:
    """Each name ``heartlora`` exports loads from the module its lazy table names (a wrong entry would only fail when
    a user first touched that name); API.md's "a new family is one register_layout(HeadLayout(...)) call" included."""
    import heartlora

    assert {"register_layout", "HeadLayout"} <= set(heartlora.__all__)
    for name in heartlora.__all__:
        assert getattr(heartlora, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        heartlora.not_a_name  # noqa: B018
