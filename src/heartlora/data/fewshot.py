"""Few-shot versions of any task: ``get_task("NAME@Kshot")``."""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from heartlora.data.base import NativeImage, Task, check_split
from heartlora.errors import TaskError


class FewShotTask(Task):
    """K images per class for training, seeded by the ``seed`` argument of ``load``.

    Protocol (the one few-shot benchmarks such as NOAH's FGVC few-shot use: a K-shot training set, a separate
    validation set for choosing settings, the task's full test split):

    - ``train800``: K images of every class drawn from the source's train800 with ``seed``. The sets are nested:
      for one seed the 1-shot images are among the 2-shot images, which are among the 4-shot images, and so on.
    - ``train800val200``: the same K-shot set, so the final model (``--protocol final``) also sees K per class.
    - ``val200``: the source's val200 unchanged; it is disjoint from the training images.
    - ``test``: the source's full test split.

    A class with fewer than K images in the source's train800 is an error (ask for fewer shots).
    """

    SEEDED = True

    def __init__(self, source: Task, shots: int) -> None:
        if shots < 1:
            raise TaskError(f"few-shot tasks need at least 1 shot, got {shots}; write NAME@Kshot with K >= 1")
        super().__init__(f"{source.name}@{shots}shot", source.class_names, "few-shot")
        self.source = source
        self.shots = shots
        self._indices: dict[int, np.ndarray] = {}

    def indices(self, seed: int = 0) -> np.ndarray:
        """Positions in the source's train800 of the K-shot training images for ``seed``, ascending."""
        seed = int(seed)
        if seed not in self._indices:
            labels = self.source.labels("train800", seed)
            members = [np.flatnonzero(labels == label) for label in range(self.num_classes)]
            self._check_enough(members)
            rng = np.random.default_rng(seed)
            chosen = []
            for label in range(self.num_classes):
                # A fresh permutation per class whose draw does not depend on K keeps the sets nested across K.
                chosen.append(rng.permutation(members[label])[: self.shots])
            self._indices[seed] = np.sort(np.concatenate(chosen))
        return self._indices[seed]

    def _check_enough(self, members: list[np.ndarray]) -> None:
        """Refuse a K that some class cannot give, naming the smallest class: its count is the largest K that works
        for every class, so the suggestion is one that loads."""
        counts = [len(m) for m in members]
        fewest = int(np.argmin(counts))
        if counts[fewest] == 0:
            raise TaskError(f"class {self.class_names[fewest]!r} of {self.source.name!r} has no training images, so "
                            "it has no K-shot sample; use a task whose train800 holds every class")
        if counts[fewest] < self.shots:
            short = sum(c < self.shots for c in counts)
            raise TaskError(f"{self.name!r} needs {self.shots} training images per class but {short} of "
                            f"{len(counts)} classes have fewer (the fewest: {counts[fewest]}, class "
                            f"{self.class_names[fewest]!r}); use {self.source.name}@{counts[fewest]}shot or fewer")

    def _source_split(self, split: str) -> str:
        check_split(split)
        return "train800" if split in ("train800", "train800val200") else split

    def labels(self, split: str, seed: int = 0) -> np.ndarray:
        labels = self.source.labels(self._source_split(split), seed)
        return labels[self.indices(seed)] if self._source_split(split) == "train800" else labels

    def native_images(self, split: str, seed: int = 0) -> Iterator[NativeImage]:
        source_split = self._source_split(split)
        if source_split != "train800":
            yield from self.source.native_images(split, seed)
            return
        wanted = set(self.indices(seed).tolist())
        for position, image in enumerate(self.source.native_images("train800", seed)):
            if position in wanted:
                yield image

    def load(self, split: str, img_size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """As Task.load; the resizing is the source's (cached), the K-shot rows are picked from it."""
        source_split = self._source_split(split)
        images, labels = self.source.load(source_split, img_size, seed)
        if source_split != "train800":
            return images, labels
        index = torch.from_numpy(self.indices(seed))
        return images[index], labels[index]
