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


def test_every_python_block_compiles():
    blocks = _blocks()
    assert blocks
    for code in blocks:
        compile(code, "README.md", "exec")
