"""Method adapters, one file per method family, registered by name.

``create_method(name, backbone, cfg, info)`` builds one; ``METHODS.names()`` lists them.
Importing this package imports every module in it, so each adapter file registers itself
with ``@register_method``; a user's adapter in their own module registers the same way
(``python -m harness --plugin my_module run ...``, see README).
"""
import importlib
import pkgutil

from methods.base import METHODS, Batch, DataInfo, Method, register_method, resolve_config

for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")


def create_method(name: str, backbone, cfg: dict, info: DataInfo) -> Method:
    """Instantiate the adapter registered as ``name``."""
    return METHODS.get(name)(backbone, cfg, info)


__all__ = ["METHODS", "Batch", "DataInfo", "Method", "create_method", "register_method", "resolve_config"]
