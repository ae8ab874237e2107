"""The tiny four-class task the engine, CLI and run-folder tests train on, written as a VTAB-1K folder so that
torchrun's processes and the command line read it like any user's dataset."""

from __future__ import annotations

from pathlib import Path

import torch

SPLIT_SIZES = {"train800": 96, "val200": 32, "test": 64}


def write_tiny_vtab(root: Path) -> str:
    """A learnable four-class task as a VTAB-1K folder (16 px images: the class sets which quadrant is bright);
    returns its task name, ``vtab:<root>``."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    root.mkdir(parents=True, exist_ok=True)
    for split, count in SPLIT_SIZES.items():
        lines = []
        for i in range(count):
            label = i % 4
            img = torch.randint(0, 90, (16, 16, 3), generator=g, dtype=torch.uint8)
            r, c = divmod(label, 2)
            img[r * 8:(r + 1) * 8, c * 8:(c + 1) * 8] += 150
            name = f"{split}_{i:03d}.png"
            Image.fromarray(img.numpy()).save(root / name)
            lines.append(f"{name} {label}")
        (root / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return f"vtab:{root}"
