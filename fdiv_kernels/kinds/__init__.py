"""The divergence kinds: the registry of built-in and custom kinds and their element terms.

``_registry`` holds every table (built-in element-term kinds, row kinds, custom kinds) and
resolves a user's ``kind=`` into what a kernel takes; ``_terms`` states the element terms in torch
(the spec of every kernel); ``_custom`` registers user f-divergences.
"""

from fdiv_kernels.kinds._custom import register_divergence, unregister_divergence
from fdiv_kernels.kinds._registry import DIVERGENCES, ROW_DIVERGENCES, KernelSpec, lookup, resolve

__all__ = ["DIVERGENCES", "KernelSpec", "ROW_DIVERGENCES", "lookup", "register_divergence",
           "resolve", "unregister_divergence"]
