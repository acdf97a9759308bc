"""sgattn's kvpress presses against kvpress's own eager ones on small randomly
initialised Llama and Qwen3 models (built from a config: no download): the
same scores to floating-point rounding, the same kept KV entries, under the
"sgattn" attention implementation (mass from the layer's own pass) and under
SDPA (mass from a second pass over the scored queries). Memory and time of
both paths are printed (-s), not asserted."""
import copy
import re
import time
from pathlib import Path

import pytest
import torch

kvpress = pytest.importorskip("kvpress", reason="kvpress is not installed (pip install sgattn[kvpress])")
transformers = pytest.importorskip("transformers", reason="transformers is not installed (comes with kvpress)")

import sgattn.integrations.kvpress as sgkv  # noqa: E402
from sgattn._report import peak_memory  # noqa: E402

sgkv.register()

SEQ = 160
CONFIGS = {
    "llama": transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=8, num_key_value_heads=2, vocab_size=128,
                                      max_position_embeddings=512),
    "qwen3": transformers.Qwen3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=8, num_key_value_heads=4, head_dim=16, vocab_size=128,
                                      max_position_embeddings=512),
}
PRESSES = {"ObservedAttentionPress": {}, "SnapKVPress": {"window_size": 32}, "TOVAPress": {}}
# (rtol, atol as a fraction of the largest score). transformers' eager attention (and kvpress's window
# recompute) take the softmax in float32 even in a float64 model, so there eager's scores carry that
# rounding against sgattn's float64 mass (measured 1.1e-7 relative); in a float32 model both sides also
# round each of up to SEQ summed probabilities (measured up to 2.7e-7 of the largest score). Either bound leaves
# a wide margin while a wrong normalisation (off by >= 1/SEQ) still fails.
TOL = {torch.float64: (1e-6, 1e-12), torch.float32: (1e-5, 1e-5)}


def _model(name, impl, dtype):
    torch.manual_seed(0)  # the same weights for every implementation
    cfg = copy.deepcopy(CONFIGS[name])  # from_config records the implementation in the config it is given
    return transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=impl, dtype=dtype).eval()


def _prefill(model, press, ids):
    """Run one prefill under ``press``: (per-layer scores, compressed cache, seconds, peak bytes)."""
    scores = []
    score = press.score
    press.score = lambda *a: scores.append(score(*a)) or scores[-1]
    cache = transformers.DynamicCache()

    def run():
        scores.clear()
        with torch.no_grad(), press(model):
            model(ids, past_key_values=cache, output_attentions=model.config._attn_implementation == "eager")

    peak = peak_memory(run, torch.device("cpu"))
    cache = transformers.DynamicCache()
    t0 = time.perf_counter()
    run()
    return list(scores), cache, time.perf_counter() - t0, peak


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("impl", ["sgattn", "sdpa"])
@pytest.mark.parametrize("press_name", list(PRESSES))
@pytest.mark.parametrize("model_name", list(CONFIGS))
def test_press_matches_eager(model_name, press_name, impl, dtype, monkeypatch):
    ids = torch.randint(0, 128, (1, SEQ), generator=torch.Generator().manual_seed(1))
    kw = dict(compression_ratio=0.5, **PRESSES[press_name])
    ref, ref_cache, ref_t, ref_peak = _prefill(_model(model_name, "eager", dtype), getattr(kvpress, press_name)(**kw),
                                               ids)
    if impl == "sgattn":  # the mass must come from the layer's own attention pass
        monkeypatch.setattr(sgkv._MassScored, "_recompute", lambda *a: pytest.fail("second pass under 'sgattn'"))
    got, got_cache, got_t, got_peak = _prefill(_model(model_name, impl, dtype), getattr(sgkv, press_name)(**kw), ids)
    print(f"\n{model_name} {press_name} {impl} {dtype}: eager {1e3 * ref_t:.1f} ms, peak {ref_peak} B; "
          f"sgattn {1e3 * got_t:.1f} ms, peak {got_peak} B")
    assert len(got) == len(ref) == CONFIGS[model_name].num_hidden_layers
    n_kept = kvpress.utils.compute_n_kept(SEQ, kw["compression_ratio"])
    for layer, (a, b) in enumerate(zip(ref, got)):
        rtol, atol = TOL[dtype]
        torch.testing.assert_close(b, a, rtol=rtol, atol=atol * a.abs().max().item(),
                                   msg=lambda m: f"layer {layer}: {m}")
        kept_a = a.topk(n_kept, dim=-1).indices.sort(-1).values
        kept_b = b.topk(n_kept, dim=-1).indices.sort(-1).values
        assert torch.equal(kept_a, kept_b), f"layer {layer}: different kept KV indices"
        ka, kb = ref_cache.layers[layer].keys, got_cache.layers[layer].keys
        assert ka.shape == kb.shape == (1, CONFIGS[model_name].num_key_value_heads, n_kept, ka.shape[-1])


def test_padding_mask_is_refused():
    model = _model("llama", "sgattn", torch.float32)
    ids = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    with torch.no_grad(), sgkv.ObservedAttentionPress(compression_ratio=0.5)(model), \
            pytest.raises(ValueError, match="without padding"):
        model(ids, attention_mask=mask, past_key_values=transformers.DynamicCache())


def test_snapkv_window_longer_than_prompt():
    model = _model("llama", "sdpa", torch.float32)
    ids = torch.randint(0, 128, (1, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), sgkv.SnapKVPress(compression_ratio=0.5, window_size=32)(model), \
            pytest.raises(ValueError):
        model(ids, past_key_values=transformers.DynamicCache())


def test_readme_example_runs():
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    code = next(b for b in re.findall(r"```python\n(.*?)```", readme, flags=re.S) if "integrations.kvpress" in b)
    torch.manual_seed(0)
    ns = {}
    exec(compile(code, "README.md", "exec"), ns)
    assert ns["kept_keys"].shape == (1, 2, 128, 8)  # the shape its comment states
