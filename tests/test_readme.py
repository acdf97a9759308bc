"""The README's Python examples run as written and their shape comments hold."""
import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parent.parent / "README.md"


def _blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_api_example_runs_and_shapes_match_the_comments():
    code = next(b for b in _blocks() if "attention_with_importance" in b)
    ns = {}
    exec(compile(code, "README.md", "exec"), ns)
    B, h, d, H, W, N, C = (ns[k] for k in ("B", "h", "d", "H", "W", "N", "C"))
    assert ns["importance"].shape == (B, N)               # window mode: per key of the grid
    assert ns["imp_map"].shape == (B, H, W)
    assert ns["merged"].shape == (B, 1 + 7 + 7, C)
    assert ns["out"].shape == (B, h, N, d)
    # the comment on the reallocation line states its shape: [B, <sum of group counts>, C]
    comment = re.search(r"merged = .*# \[B, ([\d +]+), C\]", code).group(1)
    assert ns["merged"].shape[1] == sum(int(t) for t in comment.split("+"))


def test_readme_states_what_a_newcomer_needs():
    text = " ".join(README.read_text().split())
    # the CPU-only torch build, since plain `pip install torch` fetches the CUDA one
    assert "pip install torch --index-url https://download.pytorch.org/whl/cpu" in text
    # the authors' code for the fidelity tests needs a numpy fix; a fine-tuned timm checkpoint needs num_classes
    assert "SGFORMER_OFFICIAL_DIR" in text and "np.float" in text
    assert 'pretrained_cfg_overlay=dict(file="ft.pth", num_classes=10)' in text
    # measured figures name their machine
    assert "2.60x" in text and "AMD EPYC" in text


def test_every_python_block_compiles():
    blocks = _blocks()
    assert blocks
    for code in blocks:
        compile(code, "README.md", "exec")


def test_mass_example_runs_and_shapes_match_the_comments():
    code = next(b for b in _blocks() if "attention_with_mass" in b)
    ns = {}
    exec(compile(code, "README.md", "exec"), ns)
    B, Hq, Hkv, L = (ns[k] for k in ("B", "Hq", "Hkv", "L"))
    assert ns["h2o"].shape == ns["snap"].shape == (B, Hkv, L)
    assert ns["tova"].shape == ns["cls"].shape == (B, L)
    assert ns["same"].shape == (B, Hq, L) and torch.allclose(ns["same"], ns["mass"], atol=1e-6)
    assert ns["mass_p"].shape == (Hkv, 300) and ns["out_p"].shape == (300, Hq, ns["D"])
