"""Evaluation protocols: pure metric functions plus thin wrappers registered by name.

Importing the package registers every protocol in :data:`PROTOCOLS`.
"""
from protocols import clustering, knn, linear, transfer  # noqa: F401  (registration)
from protocols.base import PROTOCOLS, EvalContext, ProtocolSpec, register_protocol

__all__ = ["PROTOCOLS", "EvalContext", "ProtocolSpec", "register_protocol",
           "clustering", "knn", "linear", "transfer"]
