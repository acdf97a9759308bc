"""Backend registry and dispatch.

A backend implements two primitives (see ``Backend``): attention with
importance, and the aggregation of importance-sorted tokens. Everything else
(hybrid-scale and self-guided attention) is composed from them in
``sgattn.ops``; a backend may override the compositions to fuse them.

Each backend declares what it runs as data (``Capabilities``, with the
kernel-side limits read from the kernels' own planners), and ``unsupported``
derives from it every reason it cannot run an input; the dispatcher takes the
first backend in ``PREFERENCE`` that can, and a forced backend (``use_backend``
or ``SGATTN_BACKEND``) that cannot raises one ``BackendError`` naming every
reason.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import os

import torch

from .. import reference

# Order in which automatic dispatch tries backends.
PREFERENCE = ("triton", "cuda", "cpu", "reference")

# The backend forced by the user; SGATTN_BACKEND is read once, at import
# (and checked at the end of this module).
_forced: str | None = os.environ.get("SGATTN_BACKEND") or None


FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# The attention-mass ops (sgattn.mass); a backend runs them as ``mass_limits`` allows.
MASS_OPS = ("attention_with_mass", "attention_mass", "attention_with_mass_varlen", "attention_mass_varlen")


class BackendError(RuntimeError):
    """No backend (or not the forced one) can run the given inputs; the
    message names every reason."""


@dataclasses.dataclass(frozen=True)
class Capabilities:
    """What a backend runs. A limit of None is no limit."""

    devices: tuple[str, ...] | None           # device types of the tensors (None: any)
    dtypes: tuple[torch.dtype, ...]           # attention (and self-guided attention)
    aggregate_dtypes: tuple[torch.dtype, ...]  # token reallocation
    head_dims: tuple[int, int] | None = None  # d and dv, inclusive range
    value_dim_is_head_dim: bool = False       # dv must equal d
    max_window: int | None = None
    max_tokens: int | None = None             # queries and keys of one attention
    dropout: bool = False                     # probability dropout
    launch_limits: str = ""                   # per-call limits asked of the kernels' planner


def attention_calls(op: str, tensors, options):
    """(q, k, v, window, hw) of each attention ``op`` runs on ``tensors``;
    self-guided attention's keys are the reallocated tokens, at most N: its
    worst case (q, q, q) stands for them."""
    window, hw = options.get("window"), options.get("hw")
    if op in ("attention", "attention_with_importance", "attention_with_mass"):
        return [(*tensors[:3], window, hw)]
    if op == "hybrid_scale_attention":  # the global triple, then the windowed one
        return [(*tensors[:3], None, None), (*tensors[3:6], window, hw)]
    if op == "self_guided_attention":
        q = tensors[0]
        return [(q, q, q, None, None)]
    return []


def _names(dtypes) -> str:
    return ", ".join(str(t).removeprefix("torch.") for t in dtypes)


def capability_reasons(caps: Capabilities, op: str, tensors, options) -> list[str]:
    """Every reason ``caps`` excludes ``op`` on ``tensors`` (empty: none)."""
    reasons = []
    if caps.devices is not None:
        kinds = " and ".join(d.upper() for d in caps.devices)
        for device in sorted({str(t.device) for t in tensors if t.device.type not in caps.devices}):
            reasons.append(f"runs {kinds} tensors only, got a tensor on {device}")
        devices = sorted({str(t.device) for t in tensors})
        if len(devices) > 1:
            reasons.append(f"tensors on several devices ({', '.join(devices)}): one launch runs on one device")
    allowed = caps.aggregate_dtypes if op == "reallocate_tokens" else caps.dtypes
    for dtype in sorted({t.dtype for t in tensors} - set(allowed), key=str):
        reasons.append(f"dtype {dtype} is not supported ({_names(allowed)} are)")
    for q, k, v, window, _ in attention_calls(op, tensors, options):
        d, dv, N, M = q.shape[-1], v.shape[-1], q.shape[2], k.shape[2]
        if caps.head_dims is not None:
            lo, hi = caps.head_dims
            for what, n in (("head dim", d), ("value head dim", dv)):
                if not lo <= n <= hi:
                    reasons.append(f"{what} {n} is outside {lo}..{hi}")
        if caps.value_dim_is_head_dim and dv != d:
            reasons.append(f"value head dim {dv} differs from head dim {d}")
        if caps.max_tokens is not None and max(N, M) > caps.max_tokens:
            reasons.append(f"{N} queries and {M} keys: more than {caps.max_tokens} in one attention")
        if window is not None and caps.max_window is not None and window > caps.max_window:
            reasons.append(f"window {window} is larger than {caps.max_window}")
    if options.get("dropout_p", 0.0) > 0 and not caps.dropout:
        reasons.append("probability dropout is not implemented")
    return list(dict.fromkeys(reasons))  # a hybrid call's two triples may repeat one


class Backend:
    """Base class: the reference composition of the two primitives.

    Subclasses set ``name`` and override ``attention`` and ``aggregate_sorted``
    (same signatures as in ``sgattn.reference``), ``unavailable``,
    ``capabilities`` and, for limits that depend on the sizes of a call,
    ``launch_limits``; they may override ``hybrid_scale_attention`` and
    ``self_guided_attention`` to fuse more.
    """

    name = "base"
    # True for a backend running on an emulator (Triton's interpreter): correct
    # but slow, so automatic dispatch skips it and only a forced choice uses it.
    emulated = False

    def unavailable(self) -> str | None:
        """Why this backend cannot run at all on this machine (None: it can)."""
        return None

    def capabilities(self) -> Capabilities:
        raise NotImplementedError

    def launch_limits(self, op: str, tensors, options) -> list[str]:
        """Why the kernels cannot launch ``op`` at these sizes (asked only of
        inputs the capabilities admit)."""
        return []

    def unsupported(self, op: str, tensors, **options) -> str | None:
        """Every reason this backend cannot run ``op`` on these inputs, joined
        by "; " (None: it can)."""
        reasons = capability_reasons(self.capabilities(), op, tensors, options)
        if not reasons and op in MASS_OPS:
            reasons = self.mass_limits(op, tensors, options)
        if not reasons:
            reasons = self.launch_limits(op, tensors, options)
        return "; ".join(reasons) or None

    def refuse_dropout(self, dropout_p):
        """A direct call of a backend method with dropout it does not implement."""
        if dropout_p > 0 and not self.capabilities().dropout:
            raise BackendError(f"backend {self.name!r} cannot run attention: probability dropout is not implemented")

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

    # Attention mass (sgattn.mass). The base class runs SG-Former's case of
    # attention_with_mass through ``attention``, whose importance is the mean
    # over heads and queries: all queries, no mask, Hq == Hkv. A backend with
    # mass kernels overrides the four methods and ``mass_limits``.

    def mass_limits(self, op: str, tensors, options) -> list[str]:
        """Why this backend cannot run the mass op ``op`` with these options."""
        if op != "attention_with_mass":
            return [f"{op} is not implemented (only attention_with_mass without causal masking, "
                    "key padding, mass_queries, grouped-query heads or lse)"]
        q, k = tensors[:2]
        wanted = {"causal masking": options["causal"],
                  "key padding masks": options["key_padding_mask"] is not None,
                  "mass over chosen queries (mass_queries)": options["mass_queries"] is not None,
                  "grouped-query attention (Hq != Hkv)": q.shape[1] != k.shape[1],
                  "return_lse": options["return_lse"]}
        return [f"{what} is not implemented" for what, asked in wanted.items() if asked]

    def attention_with_mass(self, q, k, v, *, scale, causal, key_padding_mask, mass_queries, mass_reduce,
                            mass_heads, return_lse):
        why = self.mass_limits("attention_with_mass", (q, k, v), dict(
            causal=causal, key_padding_mask=key_padding_mask, mass_queries=mass_queries, return_lse=return_lse))
        if why:
            raise BackendError(f"backend {self.name!r} cannot run attention_with_mass: {'; '.join(why)}")
        B, H, Lq, _ = q.shape
        if mass_heads == "mean":
            out, mass = self.attention(q, k, v, scale=scale)
        else:  # one head per batch entry; with Hq == Hkv the group reductions are "none"
            out, mass = self.attention(*(t.reshape(B * H, 1, t.shape[2], t.shape[3]) for t in (q, k, v)),
                                       scale=scale)
            out, mass = out.reshape(B, H, Lq, -1), mass.reshape(B, H, -1)
        # every query sees every key: "mean" and "causal_mean" are both the mean over queries
        return out, mass * Lq if mass_reduce == "sum" else mass, None

    def _mass_not_implemented(self, op):
        raise BackendError(f"backend {self.name!r} cannot run {op}: {self.mass_limits(op, (), {})[0]}")

    def attention_mass(self, q, k, lse, **options):
        self._mass_not_implemented("attention_mass")

    def attention_with_mass_varlen(self, q, k, v, **options):
        self._mass_not_implemented("attention_with_mass_varlen")

    def attention_mass_varlen(self, q, k, lse, **options):
        self._mass_not_implemented("attention_mass_varlen")


class ReferenceBackend(Backend):
    """Plain PyTorch (``sgattn.reference``): any device and dtype, the oracle."""

    name = "reference"

    def capabilities(self):
        return Capabilities(devices=None, dtypes=FLOATS, aggregate_dtypes=FLOATS, dropout=True)

    def attention(self, q, k, v, **options):
        return reference.attention(q, k, v, **options)

    def aggregate_sorted(self, x, index, weights, biases):
        return reference.aggregate_sorted(x, index, weights, biases)

    def mass_limits(self, op, tensors, options):
        return []

    def attention_with_mass(self, q, k, v, *, return_lse, **options):
        return reference.attention_with_mass(q, k, v, **options)

    def attention_mass(self, q, k, lse, **options):
        return reference.attention_mass(q, k, lse, **options)

    def attention_with_mass_varlen(self, q, k, v, *, max_seqlen_q, max_seqlen_k, return_lse, **options):
        return reference.attention_with_mass_varlen(q, k, v, **options)

    def attention_mass_varlen(self, q, k, lse, *, max_seqlen_q, max_seqlen_k, **options):
        return reference.attention_mass_varlen(q, k, lse, **options)


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
        if why:  # every reason at once
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


def _limit(value, fmt="{}") -> str:
    return "any" if value is None else fmt.format(value)


def capability_table() -> list[str]:
    """Lines of a table of what every backend runs (``sgattn info``)."""
    rows = [("backend", "devices", "attention dtypes", "reallocation dtypes", "head dims", "window",
             "tokens", "dropout")]
    notes = []
    for name in _registry:
        try:
            caps = get_backend(name).capabilities()
        except BackendError as exc:
            notes.append(f"{name}: capabilities unknown ({exc})")
            continue
        dims = _limit(caps.head_dims and "{}..{}".format(*caps.head_dims)) + (", dv = d" if caps.value_dim_is_head_dim
                                                                               else "")
        rows.append((name, _limit(caps.devices and ", ".join(caps.devices)), _names(caps.dtypes),
                     _names(caps.aggregate_dtypes), dims, _limit(caps.max_window, "<= {}"),
                     _limit(caps.max_tokens, "<= {}"), "yes" if caps.dropout else "no"))
        if caps.launch_limits:
            notes.append(f"{name}: per call, {caps.launch_limits}")
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows] + notes


def _load_all():
    """Import every backend and its extension now, at ``import sgattn``: a
    first call inside a torch.compile region must not import modules or load
    libraries while it is being traced."""
    for name in _registry:
        unavailable_reason(name)


_load_all()
if _forced is not None and _forced not in _registry:
    raise ValueError(f"SGATTN_BACKEND={_forced!r} is not a sgattn backend; known: {', '.join(_registry)}")
