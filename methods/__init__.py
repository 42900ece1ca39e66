"""Method adapters, one file per method family, registered by name.

``create_method(name, backbone, cfg, info)`` builds one; ``METHODS.names()`` lists them.
Importing this package registers every built-in adapter; a user's adapter registers itself
with ``@register_method`` from any module imported before the run (see README).
"""
from methods.base import METHODS, Batch, DataInfo, Method, register_method, resolve_config
from methods import baselines, simclr  # noqa: F401  (registration)


def create_method(name: str, backbone, cfg: dict, info: DataInfo) -> Method:
    """Instantiate the adapter registered as ``name``."""
    return METHODS.get(name)(backbone, cfg, info)


__all__ = ["METHODS", "Batch", "DataInfo", "Method", "create_method", "register_method", "resolve_config"]
