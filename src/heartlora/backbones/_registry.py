"""Built-in backbone shortcuts: a name, a one-line description and the function that builds it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from .classifier import ImageClassifier

# builder(num_classes, img_size, pretrained, pool, drop_path) -> ImageClassifier
Builder = Callable[[int, "int | None", bool, str, float], "ImageClassifier"]


@dataclass(frozen=True)
class BackboneEntry:
    """One shortcut name that `create_backbone` understands without timm or Hugging Face resolving it."""

    name: str
    description: str
    build: Builder


_SHORTCUTS: dict[str, BackboneEntry] = {}


def register_backbone(name: str, description: str) -> Callable[[Builder], Builder]:
    """Decorator: make ``name`` a shortcut for the decorated builder."""

    def decorate(build: Builder) -> Builder:
        if name in _SHORTCUTS:
            raise ValueError(f"backbone shortcut {name!r} is registered twice")
        _SHORTCUTS[name] = BackboneEntry(name, description, build)
        return build

    return decorate


def get_shortcut(name: str) -> BackboneEntry | None:
    """The shortcut called ``name``, or None."""
    return _SHORTCUTS.get(name)


def list_backbones() -> list[tuple[str, str]]:
    """The built-in shortcut names with a one-line description each, sorted by name."""
    return [(e.name, e.description) for e in sorted(_SHORTCUTS.values(), key=lambda e: e.name)]
