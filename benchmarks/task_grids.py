"""Draw an 8×8 grid of the first training images of every generated structured task, labelled with their class,
into docs/tasks/<task>.png (run from anywhere: ``python benchmarks/task_grids.py [task ...]``)."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
from PIL import Image  # noqa: E402

from heartlora.data import get_task  # noqa: E402
from heartlora.data.generated import preview  # noqa: E402

TASKS = ("dsprites_loc", "dsprites_ori", "clevr_count", "clevr_dist", "smallnorb_azi", "smallnorb_ele")
OUT = Path(__file__).resolve().parents[1] / "docs" / "tasks"


def draw_grid(name: str, rows: int = 8, cols: int = 8) -> Path:
    """Save the grid of task ``name`` and return its path."""
    images, labels = preview(name, rows * cols)
    class_names = get_task(name).class_names
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.25, rows * 1.4))
    for ax, image, label in zip(axes.flat, images, labels):
        ax.imshow(image, cmap="gray" if image.ndim == 2 else None, vmin=0, vmax=255, interpolation="nearest")
        ax.set_title(class_names[label], fontsize=6.5, pad=2)
        ax.axis("off")
    fig.suptitle(f"{name}: first {rows * cols} training images ({images.shape[1]}×{images.shape[2]} native)",
                 fontsize=10)
    fig.tight_layout(pad=0.3, h_pad=0.4, w_pad=0.2, rect=(0, 0, 1, 0.975))
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=64)
    plt.close(fig)
    # A 128-colour palette keeps the noisy smallNORB grids well under 300 KB with no visible change.
    path = OUT / f"{name}.png"
    Image.open(buffer).convert("RGB").quantize(128, dither=Image.Dither.NONE).save(path, optimize=True)
    return path


if __name__ == "__main__":
    for task in sys.argv[1:] or TASKS:
        out = draw_grid(task)
        print(f"{out} ({out.stat().st_size // 1024} KB)")
