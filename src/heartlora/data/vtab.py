"""Tasks stored in the VTAB-1K folder layout (the one NOAH and the Bi-LoRA code use).

``<folder>/train800.txt``, ``val200.txt``, ``train800val200.txt`` and ``test.txt`` hold one image per line,
``relative/path label`` (paths relative to the folder, integer labels from 0). Optional files:
``classes.txt`` (one class name per line, in label order; otherwise the names are "0".."K-1") and ``group.txt``
(natural, specialized, structured or few-shot; otherwise the group is "unknown"). When ``train800val200.txt``
is absent it is train800 followed by val200. Images may be any format PIL reads, of any size, RGB or grayscale.
A listed image must resolve (links followed) inside the folder, or inside a folder the user names in
``$HEARTLORA_IMAGE_ROOTS``: a line such as ``../../etc/passwd 0`` is refused, naming its line.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import os
import re
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np
from PIL import Image, UnidentifiedImageError

from heartlora.data.base import GROUPS, ImageTooLargeError, Task, check_split, open_image, to_pil
from heartlora.errors import TaskError


class ListEntry(NamedTuple):
    """One line of a split list: the image file, its label, and where the line is (for error messages)."""

    path: Path
    label: int
    list_file: Path
    line: int


# Folders outside a task folder where its listed images may live, named by the user (never by the folder itself):
# os.pathsep-separated. A list line whose image resolves (links followed) anywhere else is refused.
IMAGE_ROOTS_ENV = "HEARTLORA_IMAGE_ROOTS"

# More classes than any classification benchmark has; a larger label is a typo or a hostile file, refused before a
# list of class names is built from it.
MAX_CLASSES = 100_000


def read_split_list(list_file: Path, root: Path) -> list[ListEntry]:
    """Parse a VTAB-1K list file. Blank lines and extra spaces are ignored; the label is the last field, so a path
    may contain spaces. A malformed line or a label of ``MAX_CLASSES`` or more is a TaskError naming file:line."""
    entries = []
    roots = _allowed_roots(root)
    for number, line in enumerate(_read_text(list_file).splitlines(), start=1):
        line = line.strip()
        if not line:
            continue
        fields = line.rsplit(None, 1)
        # ASCII digits only: str.isdigit() also accepts "²" and other digits int() refuses.
        if len(fields) != 2 or not re.fullmatch(r"[0-9]+", fields[1]):
            raise TaskError(f"{list_file}:{number}: bad line {line!r}; each line must be 'relative/path label' with "
                            "an integer label >= 0")
        if len(fields[1].lstrip("0")) > len(str(MAX_CLASSES)) or int(fields[1]) >= MAX_CLASSES:
            raise TaskError(f"{list_file}:{number}: label {fields[1]} is not below {MAX_CLASSES:,}, heartlora's "
                            "bound on the number of classes; labels are class indices 0..K-1")
        path = root / fields[0].strip()
        real = os.path.realpath(path)
        if not any(real == r or real.startswith(r.rstrip(os.sep) + os.sep) for r in roots):
            raise TaskError(f"{list_file}:{number}: image {fields[0].strip()!r} is outside the task folder {root}: "
                            f"list images inside it, or name the folder that holds them in ${IMAGE_ROOTS_ENV} "
                            f"(folders separated by {os.pathsep!r})")
        entries.append(ListEntry(path, int(fields[1]), list_file, number))
    if not entries:
        raise TaskError(f"{list_file} lists no images; add 'relative/path label' lines")
    return entries


class VtabFolderTask(Task):
    """A task read from a VTAB-1K folder (``get_task("vtab:/path/to/folder")``)."""

    def __init__(self, folder: str) -> None:
        root = Path(folder).expanduser()
        if root.is_file():
            raise TaskError(f"{root} is a file; pass vtab:/path/to/task, the folder holding train800.txt, val200.txt "
                            "and test.txt")
        if not root.is_dir():
            raise TaskError(f"VTAB-1K folder {root} does not exist; pass vtab:/path/to/task, a folder holding "
                            "train800.txt, val200.txt and test.txt (train800val200.txt and classes.txt are optional)")
        self.root = root.resolve()
        required = ["train800", "val200", "test"]
        missing = [f"{s}.txt" for s in required if not (self.root / f"{s}.txt").is_file()]
        if missing:
            raise TaskError(f"{self.root} has no {', '.join(missing)}; a VTAB-1K folder needs train800.txt, "
                            "val200.txt, test.txt (and optionally train800val200.txt)")
        self.lists: dict[str, list[ListEntry]] = {s: read_split_list(self.root / f"{s}.txt", self.root)
                                                   for s in required}
        union = self.root / "train800val200.txt"
        self._union_is_concat = not union.is_file()
        if not self._union_is_concat:
            self.lists["train800val200"] = read_split_list(union, self.root)

        class_names = self._class_names()
        group = "unknown"
        group_file = self.root / "group.txt"
        if group_file.is_file():
            group = _read_text(group_file).strip().lower()
            if group not in GROUPS:
                raise TaskError(f"{group_file} says {group!r}; write one of {', '.join(GROUPS)}")
        super().__init__(f"vtab:{folder}", class_names, group)
        self._keys: dict[str, str] = {}

    def _class_names(self) -> list[str]:
        """classes.txt's names, or "0".."K-1" for the largest label K-1. The largest label is checked against what
        the folder allows (the names in classes.txt, else one class per listed image at most) before the list of
        names is built."""
        top = max((e for entries in self.lists.values() for e in entries), key=lambda e: e.label)
        classes_file = self.root / "classes.txt"
        if classes_file.is_file():
            lines = [c.strip() for c in _read_text(classes_file).splitlines()]
            while lines and not lines[-1]:
                lines.pop()
            if "" in lines:  # dropped, it would shift every later name onto the label before it
                raise TaskError(f"{classes_file}:{lines.index('') + 1}: blank line; give one class name per line, in "
                                "label order (line k+1 names label k)")
            names = lines
            if top.label >= len(names):
                raise TaskError(f"{top.list_file}:{top.line}: label {top.label} but {classes_file} names only "
                                f"{len(names)} classes; give one name per line for every label")
            return names
        listed = sum(len(entries) for entries in self.lists.values())
        if top.label >= listed:
            raise TaskError(f"{top.list_file}:{top.line}: label {top.label} means at least {top.label + 1:,} classes "
                            f"but the lists hold only {listed:,} images; labels are class indices 0..K-1 (add a "
                            "classes.txt if some classes have no image)")
        return [str(i) for i in range(top.label + 1)]

    def notes(self) -> list[str]:
        """Lists that disagree with each other, which nothing else would show: an image listed under two labels, a
        train800val200.txt that is not train800.txt + val200.txt (``--protocol final`` trains on it), test images
        that are also training images (test accuracy would count images the model trained on)."""
        real = functools.lru_cache(maxsize=None)(os.path.realpath)
        out = []
        first: dict[str, ListEntry] = {}
        clashes = []
        for entries in self.lists.values():
            for e in entries:
                seen = first.setdefault(real(e.path), e)
                if seen.label != e.label:
                    clashes.append((seen, e))
        if clashes:
            a, b = clashes[0]
            out.append(f"{len(clashes)} list line(s) give an image another label than an earlier line, e.g. "
                       f"{a.path.name}: {a.label} ({a.list_file.name} line {a.line}) and {b.label} ({b.list_file.name}"
                       f" line {b.line}); one of them is wrong")
        if not self._union_is_concat:
            want = collections.Counter((real(e.path), e.label) for e in self.lists["train800"] + self.lists["val200"])
            have = collections.Counter((real(e.path), e.label) for e in self.lists["train800val200"])
            if want != have:
                extra, lacking = sum((have - want).values()), sum((want - have).values())
                out.append(f"train800val200.txt is not train800.txt + val200.txt ({extra} line(s) only in it, "
                           f"{lacking} of theirs missing from it): --protocol final trains on train800val200.txt; "
                           "delete it (train800 + val200 is then used) or make it their lines")
        trained = {real(e.path) for e in self.entries("train800val200")}
        both = [e for e in self.lists["test"] if real(e.path) in trained]
        if both:
            out.append(f"{len(both)} of test.txt's {len(self.lists['test'])} images are also training images (e.g. "
                       f"{both[0].path.name}, test.txt line {both[0].line}): test accuracy counts images the model "
                       "trained on")
        return out

    def entries(self, split: str) -> list[ListEntry]:
        """The list lines of ``split`` (train800 + val200 for train800val200 when that file is absent)."""
        check_split(split)
        return [e for part in self.split_parts(split) for e in self.lists[part]]

    def split_parts(self, split: str) -> tuple[str, ...]:
        if split == "train800val200" and self._union_is_concat:
            return ("train800", "val200")
        return (split,)

    def labels(self, split: str, seed: int = 0) -> np.ndarray:
        return np.array([e.label for e in self.entries(split)], dtype=np.int64)

    def native_images(self, split: str, seed: int = 0) -> Iterator[Image.Image]:
        """Each listed image decoded to grayscale or RGB (``to_pil``), so that an image that cannot be converted is
        named with its list line."""
        for entry in self.entries(split):
            try:
                with open_image(entry.path) as image:
                    yield to_pil(image)
            except FileNotFoundError:
                raise TaskError(_missing(entry)) from None
            except ImageTooLargeError as error:  # it names the image
                raise TaskError(f"{entry.list_file.name} line {entry.line}: {error}") from None
            except TaskError as error:  # a mode to_pil refuses
                raise TaskError(f"{entry.list_file.name} line {entry.line} ({entry.path.name}): {error}") from None
            except (OSError, UnidentifiedImageError) as error:
                raise TaskError(f"cannot read image {entry.path} ({entry.list_file.name} line {entry.line}): "
                                f"{error}; replace the file or remove its line") from None

    def check(self, split: str, seed: int = 0) -> None:
        self.cache_key(split, seed)  # looks at every listed image's file

    def cache_key(self, split: str, seed: int = 0) -> str:
        """Folder, list lines and every image's file identity (device, inode, size, mtime and ctime): editing a list
        or replacing an image gives a new key, even one rewritten at the same size with its mtime put back (tar,
        ``cp -p``) or swapped with another by rename, since no program sets a ctime. A listed image that does not
        exist, or cannot be looked at, is reported here, before any decoding."""
        if split not in self._keys:
            digest = hashlib.sha1(str(self.root).encode())
            for entry in self.entries(split):
                try:
                    st = entry.path.stat()
                except FileNotFoundError:
                    raise TaskError(_missing(entry)) from None
                except OSError as error:  # a link loop, a name too long, no permission
                    raise TaskError(f"cannot look at image {entry.path} ({entry.list_file.name} line {entry.line}): "
                                    f"{error.strerror or error}; fix the file or remove its line") from None
                digest.update(f"{entry.path}\0{entry.label}\0{st.st_dev}\0{st.st_ino}\0{st.st_size}\0"
                              f"{st.st_mtime_ns}\0{st.st_ctime_ns}\n".encode())
            self._keys[split] = f"vtab-{self.root.name}-{digest.hexdigest()[:20]}"
        return self._keys[split]


def _allowed_roots(root: Path) -> list[str]:
    """The task folder and the folders of ``$HEARTLORA_IMAGE_ROOTS``, links resolved."""
    extra = [p for p in os.environ.get(IMAGE_ROOTS_ENV, "").split(os.pathsep) if p.strip()]
    return [os.path.realpath(root)] + [os.path.realpath(os.path.expanduser(p)) for p in extra]


def _read_text(path: Path) -> str:
    """A list or names file as text: UTF-8, with the byte-order mark some Windows editors write dropped (it would
    otherwise become part of the first path or class name)."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise TaskError(f"{path} is not UTF-8 text (byte {error.start}); save it as UTF-8") from None


def _missing(entry: ListEntry) -> str:
    return (f"image {entry.path} does not exist ({entry.list_file.name} line {entry.line}); restore it or remove "
            "its line")
