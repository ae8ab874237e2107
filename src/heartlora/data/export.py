"""Write any task as a VTAB-1K folder: PNG files, the four split lists, classes.txt and group.txt."""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from pathlib import Path

from heartlora._paths import folder_error
from heartlora.data.base import Task, to_pil
from heartlora.errors import TaskError


def export_task(task: Task | str, out_dir: str | Path, img_size: int | None = None, overwrite: bool = False,
                seed: int = 0) -> Path:
    """Write ``task`` to ``out_dir`` in the VTAB-1K layout and return the folder.

    Images are lossless PNGs at their native size (or resized to ``img_size`` as ``task.load`` resizes them), in
    ``images/<split>/NNNNNN.png``; an image that appears in several splits (train800val200) is written once and
    listed by each. ``get_task("vtab:" + out_dir)`` reads back the same pixels and labels. The folder is built
    beside ``out_dir`` and renamed into place at the end, so an interrupted export leaves no half-written folder.
    A non-empty ``out_dir`` is refused unless ``overwrite``. ``seed`` picks the sample of a few-shot task.
    """
    if isinstance(task, str):
        from heartlora.data.registry import get_task

        task = get_task(task)
    out = Path(out_dir).expanduser()
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise TaskError(f"{out} already exists and is not empty; choose another folder or pass overwrite=True "
                        "(--overwrite)")
    try:  # the folder the user named, and the cause, not the staging folder's temporary name
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".export", dir=out.parent))
    except OSError as exc:
        raise TaskError(f"cannot write {out}: {folder_error(out, exc)}: choose another folder") from exc
    try:
        _write(task, staging, img_size, seed)
        _replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def _write(task: Task, root: Path, img_size: int | None, seed: int) -> None:
    written: dict[str, str] = {}  # content hash → relative path, so shared images are stored once
    for split in Task.SPLITS:
        labels = task.labels(split, seed)
        if img_size is None:
            images = task.native_images(split, seed)
        else:
            images = (image.numpy().transpose(1, 2, 0) for image in task.load(split, img_size, seed)[0])
        (root / "images" / split).mkdir(parents=True)
        lines = []
        count = 0
        for index, (image, label) in enumerate(zip(images, labels)):
            pil = to_pil(image)
            digest = hashlib.sha1(f"{pil.mode}{pil.size}".encode() + pil.tobytes()).hexdigest()
            relative = written.get(digest)
            if relative is None:
                relative = f"images/{split}/{index:06d}.png"
                pil.save(root / relative)
                written[digest] = relative
            lines.append(f"{relative} {int(label)}")
            count += 1
        if count != len(labels):
            raise TaskError(f"task {task.name!r} split {split!r} gave {count} images for {len(labels)} labels")
        (root / f"{split}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (root / "classes.txt").write_text("\n".join(task.class_names) + "\n", encoding="utf-8")
    (root / "group.txt").write_text(task.group + "\n", encoding="utf-8")


def _replace(staging: Path, out: Path) -> None:
    """Move ``staging`` to ``out``; an existing ``out`` is moved aside first and deleted only once the new one is
    in place."""
    if not out.exists():
        staging.rename(out)
        return
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
        staging.rename(out)
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
    aside.rmdir()
    out.rename(aside)
    staging.rename(out)
    if aside.is_dir():
        shutil.rmtree(aside)
    else:
        aside.unlink()


__all__ = ["export_task"]
