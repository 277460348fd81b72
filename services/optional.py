"""Import modules that may not exist in this build (adapters added beside the core)."""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from types import ModuleType


def present(*names: str) -> Iterator[ModuleType]:
    """Yield each named module that exists; a missing module is skipped, but an import
    error inside an existing module is raised."""
    for name in names:
        try:
            yield importlib.import_module(name)
        except ModuleNotFoundError as error:
            if error.name is None or not name.startswith(error.name):
                raise
