"""Tile plans of the Triton kernels: tile sizes per compute kind and padded
head dim, the limits they imply (head dims, windows, programs per launch,
shared memory), and the blocks of the importance and reallocation kernels.

Tiles depend on the compute kind: fp16/bf16 ("fp16", "bf16"), or fp32 with
tf32 tensor cores ("tf32") or exact fp32 FMA ("ieee"): torch's fp32 matmul
setting (``torch.backends.cuda.matmul.allow_tf32``,
``torch.set_float32_matmul_precision``) is read at every call, so fp32 inputs
use tf32 exactly when PyTorch's own matmuls may. ``sgattn.triton.compile_check``
compiles every plan for sm_80 and sm_90 and fails on register spills, a stack
frame, or shared memory over sm_80's 163 KiB / sm_90's 227 KiB or over
``SHARED_BYTES``.
"""
from __future__ import annotations

import triton

from .. import composition

KINDS = ("fp16", "bf16", "tf32", "ieee")
HEAD_BLOCKS = (32, 64, 128)       # padded head dims (d and dv share one)
WINDOW_BLOCKS = (64, 128, 256)    # padded window sizes: w <= 8, <= 11, <= 16
MAX_WINDOW = 16
HEAD_DIM_RANGE = (16, 128)


class Plan:
    """Tiles of one (kind, BLOCK_D): fwd (BLOCK_M queries x BLOCK_N keys, one
    tile up to ``single_max`` keys), bwd (``bwd`` x ``bwd``), windows (sub-blocks
    of ``win_s`` queries, key chunks of ``win_c``; a whole window in one
    backward program up to ``win_whole`` positions). ``warps``: num_warps of
    the kernels; ``km_warps``: of ``_attn_key_major`` (default ``warps``);
    ``win_fc``: key chunks of the window forward (default ``win_c``, which is
    then the backward's only). ``mass``: overrides for the attention-mass
    variants (causal, key padding or grouped-query heads on; see ``mass_config``)."""

    def __init__(self, kind, bd, block_m, block_n, single_max, bwd, win_s, win_c, win_whole, warps=4,
                 km_warps=None, win_fc=None, mass=None):
        self.kind, self.bd = kind, bd
        self.block_m, self.block_n, self.single_max = block_m, block_n, single_max
        self.bwd, self.win_s, self.win_c, self.win_whole, self.warps = bwd, win_s, win_c, win_whole, warps
        self.km_warps = warps if km_warps is None else km_warps
        self.win_fc = win_c if win_fc is None else win_fc
        self.mass = dict(mass or {})

    def single_blocks(self):
        return [n for n in (64, 128, 256) if n <= self.single_max]


def _make_plan(kind, bd):
    # mass=...: the attention-mass variants' overrides (sm_80 / sm_90 compile
    # check: the plan's own tiles and warps spilled a few bytes there)
    if kind in ("fp16", "bf16"):
        if bd <= 32:
            return Plan(kind, bd, 64, 64, 128, 64, 64, 64, 64)  # 256-key tiles spill on sm_80
        if bd <= 64:  # 64-wide backward tiles spill on sm_80 (split ds, exact delta)
            return Plan(kind, bd, 64, 64, 128, 32, 32, 32, 0)
        return Plan(kind, bd, 64, 64, 64, 32, 32, 32, 0)
    if kind == "tf32":
        if bd <= 32:  # window forward key chunks of 32 (64: windows of 12..16 spilled 8 B on sm_80)
            return Plan(kind, bd, 64, 64, 128, 64, 32, 64, 0, win_fc=32, mass=dict(fwd_block_m=32, fwd_warps=8))
        if bd <= 64:
            return Plan(kind, bd, 64, 32, 64, 32, 32, 32, 0, mass=dict(fwd_block_m=32, grads_block_n=16))
        return Plan(kind, bd, 32, 32, 64, 32, 16, 16, 0, mass=dict(bwd_q_warps=8, grads_block_n=16))
    # ieee: fp32 FMA dots keep both operands in registers (a whole head-dim
    # row per thread): small tiles.
    if bd <= 32:  # backward window key chunks of 16 (32: window bwd mode 3 spilled 8 B on sm_80);
        # the window forward keeps 32-key chunks
        return Plan(kind, bd, 32, 32, 64, 32, 16, 16, 0, win_fc=32)
    if bd <= 64:  # 8 warps (4: window bwd mode 2 spilled 4 B on sm_90)
        return Plan(kind, bd, 16, 32, 64, 16, 16, 16, 0, warps=8)
    # d > 64: no single-tile rows (importance from the key-major pass), 8 warps;
    # the key-major pass 4 (8: dK/dV spilled 4 B on sm_90)
    return Plan(kind, bd, 16, 32, 0, 16, 16, 16, 0, warps=8, km_warps=4, mass=dict(bwd_q_warps=4))


PLANS = {(kind, bd): _make_plan(kind, bd) for kind in KINDS for bd in HEAD_BLOCKS}


def fp32_precision() -> str:
    """"tf32" when torch lets fp32 matmuls use TF32 (``allow_tf32``, or
    ``set_float32_matmul_precision`` "high"/"medium", or the fp32_precision
    API set to "tf32"), else "ieee". Read on the host at every call."""
    import torch
    try:
        prec = torch.get_float32_matmul_precision()
    except RuntimeError:  # legacy and new precision APIs mixed: ask the new one
        prec = "high" if getattr(torch.backends.cuda.matmul, "fp32_precision", "ieee") == "tf32" else "highest"
    return "ieee" if prec == "highest" else "tf32"


def kind_of(dtype) -> str:
    import torch
    if dtype == torch.float16:
        return "fp16"
    if dtype == torch.bfloat16:
        return "bf16"
    return fp32_precision()


def head_block(d: int, dv: int) -> int:
    return max(HEAD_BLOCKS[0], triton.next_power_of_2(max(int(d), int(dv))))


def window_block(window: int) -> int:
    return max(WINDOW_BLOCKS[0], triton.next_power_of_2(int(window) ** 2))


def plan_for(dtype, d: int, dv: int) -> Plan:
    return PLANS[(kind_of(dtype), head_block(d, dv))]


def kinds_of(dtype):
    """Every kind a dtype may run as (fp32: tf32 or ieee, by torch's setting at
    call time). Used where the setting must not be read (under torch.compile's
    tracing of dispatch, a graph break): the worst case over them."""
    import torch
    return ("tf32", "ieee") if dtype == torch.float32 else (kind_of(dtype),)


def global_config(plan: Plan, M: int):
    """(single_tile, BLOCK_N) of the global forward for M keys."""
    if M <= plan.single_max:
        return True, max(64, triton.next_power_of_2(int(M)))
    return False, plan.block_n


def mass_config(plan: Plan, masked: bool) -> dict:
    """Tiles and warps of the attention-mass launches: the plan's, with its
    ``mass`` overrides where ``masked`` (causal, key padding or grouped-query
    heads on; without them the kernels are SG-Former's and keep its plan).
    fwd_block_m/_warps: the forward (key tiles of ``block_n``); bwd_q_warps: dQ;
    grads_block_n/_warps: the key-major dK/dV pass (query tiles of ``bwd``)."""
    o = plan.mass if masked else {}
    return dict(fwd_block_m=o.get("fwd_block_m", plan.block_m), fwd_warps=o.get("fwd_warps", plan.warps),
                bwd_q_warps=o.get("bwd_q_warps", plan.warps), grads_block_n=o.get("grads_block_n", plan.bwd),
                grads_warps=o.get("grads_warps", plan.km_warps))


def window_config(plan: Plan, window: int):
    """(BLOCK_L, BLOCK_S, BLOCK_C, backward modes) of a w x w window."""
    L = window_block(window)
    S, C = min(L, plan.win_s), min(L, plan.win_c)
    modes = (1,) if (S == L and C == L and L <= plan.win_whole) else (2, 3)
    return L, S, C, modes


def partial_rows(plan: Plan, h: int, N: int, M: int, window, need_importance: bool) -> int:
    """Rows of the importance partials [B, rows, M] the forward writes."""
    if not need_importance:
        return 0
    if window:
        L, S, _, _ = window_config(plan, window)
        return h * (L // S)
    single, _ = global_config(plan, M)
    return h * triton.cdiv(N, plan.block_m) if single else h


def window_grid(hw, window):
    H, W = hw
    return triton.cdiv(H, window), triton.cdiv(W, window)


def grid_programs(plan: Plan, B, h, N, M, window, hw, backward=True, mass=False) -> int:
    """The largest 1-D grid the forward (and backward) launches for this input
    (``mass``: of the attention-mass launches, whose tiles may be smaller)."""
    if window:
        L, S, _, _ = window_config(plan, window)
        nwy, nwx = window_grid(hw, window) if hw else (N, 1)
        return nwy * nwx * (L // S) * B * h
    mc = mass_config(plan, mass)
    tiles = [triton.cdiv(N, mc["fwd_block_m"]), triton.cdiv(M, plan.block_n)]
    if backward:
        tiles += [triton.cdiv(N, plan.bwd), triton.cdiv(M, mc["grads_block_n"])]
    return max(tiles) * B * h


# Shared memory per block (bytes) the kernels of a plan need at most, the
# maximum over sm_80 and sm_90 as compile_check measures it (the compile test
# fails when a measurement exceeds its entry). ``unsupported`` compares it with
# the GPU's opt-in limit.
# Provisional entries (sm_90 measurements of the largest plans, rounded up;
# the full compile check refines them): the gate fails when one is exceeded.
SHARED_BYTES = {
    ("fp16", 32): 64 * 1024, ("fp16", 64): 96 * 1024, ("fp16", 128): 128 * 1024,
    ("bf16", 32): 64 * 1024, ("bf16", 64): 96 * 1024, ("bf16", 128): 128 * 1024,
    ("tf32", 32): 96 * 1024, ("tf32", 64): 128 * 1024, ("tf32", 128): 160 * 1024,
    ("ieee", 32): 96 * 1024, ("ieee", 64): 128 * 1024, ("ieee", 128): 160 * 1024,
}
SHARED_BYTES_AGGREGATE = 32 * 1024


def shared_bytes_needed(dtypes, head_dims) -> int:
    """The most shared memory the launches for these inputs may need."""
    need = SHARED_BYTES_AGGREGATE
    dims = [int(d) for d in head_dims] or [HEAD_BLOCKS[0]]
    for dt in set(dtypes):
        for kind in kinds_of(dt):
            for d in dims:
                need = max(need, SHARED_BYTES[(kind, head_block(d, d))])
    return need


# Importance reduction: tokens per program.
IMPORTANCE_BLOCK = 256
# Reallocation backward: tokens and channels per program.
REALLOCATION_BWD_BLOCKS = (32, 64)


def reallocation_blocks(C: int, group_sizes):
    """(BLOCK_C, BLOCK_R) of the forward: channel tile and member block."""
    return min(128, max(16, triton.next_power_of_2(C))), min(64, max(16, triton.next_power_of_2(max(group_sizes))))


def reallocation_plan(N: int, group_sizes):
    """Kernel scalars of a reallocation plan: part starts S, merged-row starts O,
    group sizes R (padded to 3 parts), and the total merged length."""
    parts = composition.reallocation_parts(N, len(group_sizes))
    groups = [-(-n // r) for n, r in zip(parts, group_sizes)]
    R = list(group_sizes) + [1] * (3 - len(group_sizes))
    S1 = parts[0]
    S2 = parts[0] + parts[1] if len(parts) == 3 else N
    O1 = groups[0]
    O2 = groups[0] + groups[1] if len(groups) == 3 else sum(groups)  # 2 parts: no third
    return dict(O1=O1, O2=O2, S1=S1, S2=S2, R0=R[0], R1=R[1], R2=R[2]), parts, groups
