"""Backend registry and dispatch.

A backend implements two primitives (see ``Backend``): attention with
importance, and the aggregation of importance-sorted tokens. Everything else
(hybrid-scale and self-guided attention) is composed from them in
``sgattn.ops``; a backend may override the compositions to fuse them.

Each backend says why it cannot run an input (``unsupported``); the
dispatcher takes the first backend in ``PREFERENCE`` that can, and a forced
backend (``use_backend`` or ``SGATTN_BACKEND``) that cannot raises an error
naming the reason.
"""
from __future__ import annotations

import contextlib
import importlib
import os

import torch

from .. import reference

# Order in which automatic dispatch tries backends.
PREFERENCE = ("triton", "cuda", "cpu", "reference")

# The backend forced by the user; SGATTN_BACKEND is read once, at import
# (and checked at the end of this module).
_forced: str | None = os.environ.get("SGATTN_BACKEND") or None


class BackendError(RuntimeError):
    """No backend (or not the forced one) can run the given inputs."""


class Backend:
    """Base class: the reference composition of the two primitives.

    Subclasses set ``name`` and override ``attention`` and ``aggregate_sorted``
    (same signatures as in ``sgattn.reference``), ``unavailable`` and
    ``unsupported``; they may override ``hybrid_scale_attention`` and
    ``self_guided_attention`` to fuse more.
    """

    name = "base"
    # True for a backend running on an emulator (Triton's interpreter): correct
    # but slow, so automatic dispatch skips it and only a forced choice uses it.
    emulated = False

    def unavailable(self) -> str | None:
        """Why this backend cannot run at all on this machine (None: it can)."""
        return None

    def unsupported(self, op: str, tensors, **options) -> str | None:
        """Why this backend cannot run ``op`` on these inputs (None: it can)."""
        return None

    def attention(self, q, k, v, *, scale=None, window=None, hw=None, dropout_p=0.0,
                  need_importance=True):
        raise NotImplementedError

    def aggregate_sorted(self, x, index, weights, biases):
        raise NotImplementedError

    def hybrid_scale_attention(self, q_global, k_global, v_global, q_local, k_local, v_local, *,
                               hw, reduced_hw, window=7, scale=None, dropout_p=0.0):
        out_g, imp_g = self.attention(q_global, k_global, v_global, scale=scale, dropout_p=dropout_p)
        out_l, imp_l = self.attention(q_local, k_local, v_local, scale=scale, window=window, hw=hw,
                                      dropout_p=dropout_p)
        importance = reference.hybrid_importance(imp_g, imp_l, hw, reduced_hw)
        return torch.cat([out_g, out_l], dim=1), importance

    def self_guided_attention(self, q, x, importance, kv1_weight, kv1_bias, kv2_weight, kv2_bias,
                              agg_weights, agg_biases, *, hw, scale=None, dropout_p=0.0):
        seq = self.aggregate_sorted(x, reference.self_guided_index(importance, hw),
                                    agg_weights, agg_biases)
        return reference.attention_over_reallocated(
            q, seq, kv1_weight, kv1_bias, kv2_weight, kv2_bias, self.attention,
            scale=scale, dropout_p=dropout_p)


class ReferenceBackend(Backend):
    """Plain PyTorch (``sgattn.reference``): any device and dtype, the oracle."""

    name = "reference"

    def attention(self, q, k, v, **options):
        return reference.attention(q, k, v, **options)

    def aggregate_sorted(self, x, index, weights, biases):
        return reference.aggregate_sorted(x, index, weights, biases)


# name -> module that defines ``BACKEND`` (loaded on first use), or the instance.
_registry: dict[str, object] = {
    "triton": "sgattn.backends.triton",
    "cuda": "sgattn.backends.cuda",
    "cpu": "sgattn.backends.cpu",
    "reference": ReferenceBackend(),
}
_load_errors: dict[str, str] = {}


def _load(name: str) -> Backend | None:
    entry = _registry[name]
    if isinstance(entry, str):
        try:
            entry = importlib.import_module(entry).BACKEND
        except Exception as exc:  # a missing optional dependency or extension
            _load_errors[name] = f"{type(exc).__name__}: {exc}"
            entry = None
        _registry[name] = entry
    return entry


def get_backend(name: str) -> Backend:
    if name not in _registry:
        raise ValueError(f"unknown sgattn backend {name!r}; known: {', '.join(_registry)}")
    backend = _load(name)
    if backend is None:
        raise BackendError(f"backend {name!r} could not be loaded: {_load_errors[name]}")
    return backend


def unavailable_reason(name: str) -> str | None:
    backend = _load(name)
    if backend is None:
        return f"could not be loaded ({_load_errors[name]})"
    return backend.unavailable()


def available_backends() -> dict[str, str | None]:
    """Every known backend mapped to None when it can run on this machine, or
    to the reason it cannot."""
    return {name: unavailable_reason(name) for name in _registry}


def forced_backend() -> str | None:
    return _forced


@contextlib.contextmanager
def use_backend(name: str | None):
    """Force ``name`` for the ops called inside the block (None: automatic)."""
    global _forced
    if name is not None:
        get_backend(name)  # unknown or unloadable names fail here, not later
    previous, _forced = _forced, name
    try:
        yield
    finally:
        _forced = previous


def select(op: str, tensors, **options) -> Backend:
    """The backend that runs ``op`` on ``tensors``: the forced one, or the first
    in ``PREFERENCE`` that can. An empty batch runs on the reference backend
    (plain torch ops handle it; there is nothing for a kernel to do)."""
    if tensors[0].shape[0] == 0:
        return _registry["reference"]
    if _forced is not None:
        backend = get_backend(_forced)
        why = backend.unavailable() or backend.unsupported(op, tensors, **options)
        if why:
            raise BackendError(f"backend {_forced!r} cannot run {op}: {why}")
        return backend
    reasons = []
    for name in PREFERENCE:
        why = unavailable_reason(name)
        backend = _registry[name]
        if why is None and backend.emulated:
            why = "runs only on an emulator here (used when forced)"
        if why is None:
            why = backend.unsupported(op, tensors, **options)
            if why is None:
                return backend
        reasons.append(f"{name}: {why}")
    raise BackendError(f"no sgattn backend can run {op}: " + "; ".join(reasons))


def _load_all():
    """Import every backend and its extension now, at ``import sgattn``: a
    first call inside a torch.compile region must not import modules or load
    libraries while it is being traced."""
    for name in _registry:
        unavailable_reason(name)


_load_all()
if _forced is not None and _forced not in _registry:
    raise ValueError(f"SGATTN_BACKEND={_forced!r} is not a sgattn backend; known: {', '.join(_registry)}")
