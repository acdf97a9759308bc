"""kvpress presses that score keys with sgattn's attention mass instead of
eager attention weights (no [B, Hq, L, L] matrix).

    import sgattn.integrations.kvpress as sgkv
    sgkv.register()          # the "sgattn" attention implementation for transformers
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="sgattn")
    with sgkv.ObservedAttentionPress(compression_ratio=0.5)(model):
        model(input_ids, past_key_values=DynamicCache())

Under ``attn_implementation="sgattn"`` each layer's prefill attention returns
the mass its press needs from the same pass (``sgattn.attention_with_mass``);
under any other implementation (e.g. "sdpa") the press recomputes the queries
it scores with and runs ``attention_with_mass`` on them, a second pass that
for SnapKV / TOVA covers only the observation window. The scores equal
kvpress's eager ones (ObservedAttentionPress, SnapKVPress, TOVAPress) up to
floating-point rounding. The "sgattn" implementation runs causal attention
without a padding mask (batch rows of equal length); other masks raise.
"""
from contextlib import contextmanager
from dataclasses import dataclass

import torch.nn.functional as F

import sgattn

try:
    import kvpress
    from kvpress.utils import get_prerope_query_states
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    from transformers.models.llama.modeling_llama import rotate_half
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(f"sgattn.integrations.kvpress needs kvpress and transformers ({exc}); "
                      "install them with `pip install sgattn[kvpress]` (or `pip install kvpress`)") from exc

IMPLEMENTATION = "sgattn"
_REQUEST = "_sgattn_mass_request"  # set on each attention layer while a press is active
_MASS = "_sgattn_mass"  # the mass the layer's last prefill computed, taken by the press


def attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                      **kwargs):
    """transformers attention function: SDPA's output, plus the mass the active
    press asked for when this call is a prefill (as many queries as keys)."""
    request = getattr(module, _REQUEST, None)
    if request is None or query.shape[2] != key.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    if attention_mask is not None:
        raise ValueError("the 'sgattn' attention implementation scores causal attention without padding; got an "
                         f"attention mask of shape {tuple(attention_mask.shape)} (pad-free batches only)")
    if dropout:
        raise ValueError(f"the 'sgattn' attention implementation has no dropout (got {dropout})")
    causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    out, mass = sgattn.attention_with_mass(query, key, value, scale=scaling, causal=causal, **request)
    setattr(module, _MASS, mass)
    return out.transpose(1, 2).contiguous(), None


def register():
    """Register the "sgattn" attention implementation (and SDPA's mask for it)
    with transformers; idempotent."""
    AttentionInterface.register(IMPLEMENTATION, attention_forward)
    AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)


def _layers(model):
    lm = model.model.language_model if hasattr(model.model, "language_model") else model.model
    return [layer.self_attn for layer in lm.layers]


class _MassScored:
    """Mixin over a kvpress ScorerPress: ``score`` from sgattn's mass.

    Subclasses give ``queries`` (None: every query; n: the last n), the mass
    reduction over them and over heads, and ``from_mass`` (kvpress's
    post-processing of the reduced weights)."""

    queries = None
    mass_reduce = "sum"
    mass_heads = "none"

    def _request(self):
        return {"mass_queries": self.queries, "mass_reduce": self.mass_reduce, "mass_heads": self.mass_heads}

    @contextmanager
    def __call__(self, model):
        layers = _layers(model)
        for layer in layers:
            setattr(layer, _REQUEST, self._request())
        try:
            with super().__call__(model):
                yield
        finally:
            for layer in layers:
                layer.__dict__.pop(_REQUEST, None)
                layer.__dict__.pop(_MASS, None)

    def score(self, module, hidden_states, keys, values, attentions, kwargs):
        mass = module.__dict__.pop(_MASS, None)
        if mass is None:  # not the "sgattn" implementation: a second pass over the scored queries
            mass = self._recompute(module, hidden_states, keys, values, kwargs["position_embeddings"])
        if mass.shape[-1] != keys.shape[2]:
            raise RuntimeError(f"attention mass over {mass.shape[-1]} keys for a cache of {keys.shape[2]}")
        return self.from_mass(mass, keys)

    def _recompute(self, module, hidden_states, keys, values, position_embeddings):
        n = hidden_states.shape[1] if self.queries is None else self.queries
        q = get_prerope_query_states(module, hidden_states[:, -n:])
        cos, sin = (t[:, -n:].unsqueeze(1) for t in position_embeddings)
        q = q * cos + rotate_half(q) * sin
        request = dict(self._request(), mass_queries=None)  # q holds exactly the scored queries
        return sgattn.attention_with_mass(q, keys, values, scale=module.scaling, causal=True, **request)[1]


def _keep_last(scores, n):
    """kvpress's padding of the last n keys with a score above every other."""
    return F.pad(scores, (0, n), value=scores.max().item() + 1)


@dataclass
class ObservedAttentionPress(_MassScored, kvpress.ObservedAttentionPress):
    """H2O-style: each key's attention summed over the queries that see it,
    divided by their number, averaged over the GQA group -> [B, Hkv, L]."""

    mass_reduce = "causal_mean"
    mass_heads = "group_mean"

    def from_mass(self, mass, keys):
        return mass


@dataclass
class SnapKVPress(_MassScored, kvpress.SnapKVPress):
    """SnapKV: the last ``window_size`` queries' mean attention on the keys
    before the window, pooled (``kernel_size``), averaged over the GQA group;
    the window's own keys are kept."""

    mass_reduce = "mean"
    mass_heads = "group_mean"

    @property
    def queries(self):
        return self.window_size

    def from_mass(self, mass, keys):
        if keys.shape[2] <= self.window_size:
            raise ValueError(f"SnapKV needs more keys ({keys.shape[2]}) than its window ({self.window_size})")
        # pooling is linear along the keys, so it commutes with kvpress's group mean taken after it
        scores = F.avg_pool1d(mass[..., :-self.window_size], kernel_size=self.kernel_size,
                              padding=self.kernel_size // 2, stride=1)
        return _keep_last(scores, self.window_size)


@dataclass
class TOVAPress(_MassScored, kvpress.TOVAPress):
    """TOVA: the last query's attention averaged over all heads, the same for
    every KV head; the last key is kept."""

    queries = 1
    mass_heads = "mean"

    def from_mass(self, mass, keys):
        scores = mass[:, None, :-1].repeat(1, keys.shape[1], 1)
        return _keep_last(scores, 1)
