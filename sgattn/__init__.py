"""sgattn: kernel-accelerated SG-Former attention.

Functional ops (``attention_with_importance``, ``hybrid_scale_attention``,
``self_guided_attention``, ``reallocate_tokens``) dispatch to the first
backend that can run their inputs; ``use_backend(name)`` or the
``SGATTN_BACKEND`` environment variable (read at import) forces one.
``attention_with_mass`` and ``attention_mass`` (and their ``_varlen`` forms
over packed sequences) return how much attention every key receives, with
causal masking, grouped-query heads and key padding (``sgattn.mass``).
``sgattn.nn`` has the attention modules, ``sgattn.models`` the SG-Former
S/M/B models (registered with timm when timm is installed).
"""
from . import nn, reference
from . import models  # noqa: E402  (after nn: the models build on it)
from .backends import BackendError, available_backends, use_backend
from .nn import patch_model
from .mass import attention_mass, attention_mass_varlen, attention_with_mass, attention_with_mass_varlen
from .ops import attention_with_importance, hybrid_scale_attention, reallocate_tokens, self_guided_attention

__version__ = "0.1.0"

__all__ = [
    "attention_with_importance",
    "hybrid_scale_attention",
    "self_guided_attention",
    "reallocate_tokens",
    "attention_with_mass",
    "attention_mass",
    "attention_with_mass_varlen",
    "attention_mass_varlen",
    "use_backend",
    "available_backends",
    "patch_model",
    "BackendError",
    "nn",
    "reference",
    "models",
]
