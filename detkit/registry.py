"""The section registry: which class builds each cfg section kind.

It sits below every layer and head so that they can register themselves where they are defined,
and so that the cfg parser never has to know which builders exist. Whoever validates a cfg's
section names (detkit.model) asks this registry; whoever adds a layer or head only decorates it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

Builder = TypeVar("Builder", bound=type)

_BUILDERS: dict[str, type] = {}
_EXTENSIONS: set[str] = set()


class RegistryError(RuntimeError):
    """Two classes claim the same section kind: a programming error, caught at import time."""


def register(kind: str, *, extension: bool = False) -> Callable[[Builder], Builder]:
    """Class decorator: `cls(index, section, ctx)` builds every cfg section `[kind]`.

    `extension=True` marks a section detkit adds to darknet's format (SSD and friends); a cfg
    using one does not load in darknet, so the layer table and docs can say so.
    """

    def add(cls: Builder) -> Builder:
        owner = _BUILDERS.get(kind)
        if owner is not None and owner is not cls:
            raise RegistryError(f"section [{kind}] is already built by {owner.__qualname__}, "
                                f"not {cls.__qualname__}")
        _BUILDERS[kind] = cls
        if extension:
            _EXTENSIONS.add(kind)
        return cls

    return add


def builder_for(kind: str) -> type | None:
    """The class that builds `[kind]`, or None when nothing registered it."""
    return _BUILDERS.get(kind)


def builders() -> dict[str, type]:
    """A copy of the whole table, section kind -> class."""
    return dict(_BUILDERS)


def extension_sections() -> frozenset[str]:
    """The sections detkit adds beyond darknet's."""
    return frozenset(_EXTENSIONS)
