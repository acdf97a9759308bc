"""kvpress presses end to end: one prefill of a randomly initialised Llama (built
from a config, no download) compressed by a press, scored as kvpress does it
(``naive``: ObservedAttentionPress needs ``attn_implementation="eager"``, the
whole [B, Hq, L, L] weight matrix per layer; SnapKV and TOVA run under SDPA and
recompute their window's rows eagerly) against sgattn's presses under
``attn_implementation="sgattn"`` (the mass from the layer's own attention pass)
and under SDPA (a second pass over the scored queries only). Time and peak
memory of the whole prefill; rows of a case run back to back."""
import copy
import os

import pytest
import torch

kvpress = pytest.importorskip("kvpress", reason="kvpress is not installed (pip install sgattn[kvpress])")
transformers = pytest.importorskip("transformers", reason="transformers is not installed (comes with kvpress)")

import sgattn.integrations.kvpress as sgkv  # noqa: E402

import report  # noqa: E402

sgkv.register()
DEVICE = report.resolve_device(os.environ.get("SGATTN_BENCH_DEVICE"))
# A Llama-style layer at a small width (attention dominates at these lengths): 16 query heads,
# 4 KV heads of dim 64, 2 layers.
CONFIG = transformers.LlamaConfig(hidden_size=1024, intermediate_size=2048, num_hidden_layers=2,
                                  num_attention_heads=16, num_key_value_heads=4, vocab_size=1024,
                                  max_position_embeddings=65536)
PRESSES = {"ObservedAttentionPress": ({}, "eager"), "SnapKVPress": ({"window_size": 64}, "sdpa"),
           "TOVAPress": ({}, "sdpa")}
SET = os.environ.get("SGATTN_BENCH_SHAPES") or ("full" if DEVICE.type == "cuda" else "cpu")
LENGTHS = {"smoke": (128,), "cpu": (1024, 4096), "headline": (4096,), "full": (4096, 16384)}.get(SET, (1024,))
IMPLS = ("naive", "sgattn:sgattn", "sgattn:sdpa")


def _model(impl):
    torch.manual_seed(0)  # the same weights for every row
    dtype = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
    return transformers.AutoModelForCausalLM.from_config(copy.deepcopy(CONFIG), attn_implementation=impl,
                                                         dtype=dtype).to(DEVICE).eval()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("press_name", list(PRESSES))
def test_press_prefill(run_case, press_name, length, impl):
    kw, eager_impl = PRESSES[press_name]
    case = f"{press_name}-L{length}"
    shape = {"press": press_name, "length": length, "heads": 16, "kv_heads": 4, "dim": 64, "layers": 2}
    if impl == "naive":
        model, press = _model(eager_impl), getattr(kvpress, press_name)(compression_ratio=0.5, **kw)
    else:
        model, press = _model(impl.split(":")[1]), getattr(sgkv, press_name)(compression_ratio=0.5, **kw)
    ids = torch.randint(0, CONFIG.vocab_size, (1, length), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    eager = model.config._attn_implementation == "eager"

    def prefill():
        with torch.no_grad(), press(model):
            model(ids, past_key_values=transformers.DynamicCache(), output_attentions=eager)
    run_case("kvpress", case, "prefill", impl, prefill, shape=shape)
