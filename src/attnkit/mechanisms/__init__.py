"""Importing this package registers every method (one module per mechanism)."""

import importlib
import pkgutil

_SKIP = {"pattern_method"}


def _import_all() -> None:
    for info in pkgutil.walk_packages(__path__, prefix=__name__ + "."):
        leaf = info.name.rsplit(".", 1)[-1]
        if leaf.startswith("_") or leaf in _SKIP or leaf == "base":
            continue
        importlib.import_module(info.name)


_import_all()
