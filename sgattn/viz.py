"""Pictures of SG-Former's importance maps and token reallocation.

Every hybrid-scale block of an SG-Former computes an *importance map*: how
much attention each token of its H x W grid receives (global heads' mean
attention to the reduced map, upsampled, plus local heads' mean attention
inside 7x7 windows). The next, self-guided, block sorts the tokens by that
map and merges them: the least important quarter (half in stage 3) into
large groups (coarse), the most important into small groups or single tokens
(fine). This module captures both and draws them over the image, as in
figure 2 of the SG-Former paper.

    from sgattn import viz
    model = sgattn.models.sgformer_s(checkpoint_path="sgformer_s.pth").eval()
    image = viz.load_image("photo.jpg")            # uint8 [H, W, 3]
    maps = viz.importance_maps(model, image)       # one entry per hybrid-scale block
    viz.plot_importance(image, maps, "importance.png")

or ``sgattn viz photo.jpg --checkpoint sgformer_s.pth --out importance.png``.
Drawing needs matplotlib and Pillow (``pip install 'sgattn[viz]'``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .nn import HybridScaleAttention
from .composition import REALLOCATION_GROUPS, reallocation_parts

# Below this coefficient of variation (std / mean) a map is called near-uniform:
# random weights give 0.005-0.02, where any colour difference is noise.
NEAR_UNIFORM_CV = 0.05
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SAMPLE_IMAGES = ("china", "flower")  # photographs bundled with scikit-learn


def _need(module: str, extra: str = "viz"):
    try:
        return __import__(module, fromlist=["_"])
    except ImportError as exc:
        raise ImportError(f"this needs {module.split('.')[0]}: pip install 'sgattn[{extra}]'") from exc


@dataclass
class BlockImportance:
    """One hybrid-scale block: ``importance`` [B, H, W] (float32) and, for the
    self-guided block after it, ``group_size`` [B, H, W]: how many tokens the
    group holding each position merges into one (1 = kept at full
    resolution; large = coarse)."""

    stage: int          # 1..4
    block: int          # index of the hybrid-scale block in its stage
    importance: torch.Tensor
    group_size: Optional[torch.Tensor]

    @property
    def name(self) -> str:
        return f"stage {self.stage} block {self.block}"

    @property
    def cv(self) -> float:
        """The map's spread: std / mean over the tokens of the first image (0: uniform)."""
        v = self.importance[0].double()
        return (v.std() / v.mean()).item()

    @property
    def near_uniform(self) -> bool:
        return self.cv < NEAR_UNIFORM_CV


def group_sizes(importance: torch.Tensor, sr_ratio: int) -> torch.Tensor:
    """[B, H, W] -> [B, H, W]: the reallocation group size of each token when a
    self-guided block of reduction ``sr_ratio`` sorts the map (stable ascending
    sort: least important first, coarse groups first)."""
    B, H, W = importance.shape
    sizes = REALLOCATION_GROUPS[sr_ratio]
    parts = reallocation_parts(H * W, len(sizes))
    per_rank = torch.cat([torch.full((n,), float(r)) for n, r in zip(parts, sizes)]).to(importance.device)
    order = torch.sort(importance.reshape(B, -1).float(), dim=-1, stable=True).indices
    out = torch.empty(B, H * W, device=importance.device)
    out.scatter_(1, order, per_rank.expand(B, -1))
    return out.reshape(B, H, W)


def importance_maps(model: torch.nn.Module, images, size: Optional[int] = None) -> List[BlockImportance]:
    """Run ``model`` (an SG-Former) once and return the importance map of every
    hybrid-scale block, in order, with the reallocation of the self-guided
    block that consumes it. ``images`` is a normalised float tensor
    [B, 3, H, W] or a uint8 image [H, W, 3] (see ``to_tensor``; ``size``
    resizes it so that its shorter side is ``size``)."""
    if not isinstance(images, torch.Tensor) or images.dtype == torch.uint8:
        images = to_tensor(images, size)
    param = next(model.parameters())
    images = images.to(device=param.device, dtype=param.dtype)
    found: List[BlockImportance] = []
    hooks = []
    stages = {}
    for name, module in model.named_modules():
        if isinstance(module, HybridScaleAttention):
            stage = int(name.split(".")[0].replace("block", "")) if name.startswith("block") else 0
            stages.setdefault(stage, 0)
            index = stages[stage]
            stages[stage] += 1

            def hook(mod, inputs, output, stage=stage, index=index):
                _, H, W = inputs[:3]
                row_major = output[1][0].detach().float()
                imp = row_major.reshape(-1, H, W).cpu()
                sizes = group_sizes(imp, mod.sr_ratio) if mod.sr_ratio in REALLOCATION_GROUPS else None
                found.append(BlockImportance(stage, index, imp, sizes))

            hooks.append(module.register_forward_hook(hook))
    if not hooks:
        raise ValueError(f"{type(model).__name__} has no sgattn.nn.HybridScaleAttention module")
    try:
        with torch.no_grad():
            model(images)
    finally:
        for h in hooks:
            h.remove()
    return found


def load_image(source, size: int = 224) -> np.ndarray:
    """A uint8 RGB image [H, W, 3] resized so that its shorter side is ``size``.
    ``source``: a file path (needs Pillow), an array [H, W, 3], or
    ``"sample:china"`` / ``"sample:flower"`` (photographs bundled with
    scikit-learn)."""
    Image = _need("PIL.Image")
    if isinstance(source, str) and source.startswith("sample:"):
        name = source.split(":", 1)[1]
        if name not in SAMPLE_IMAGES:
            raise ValueError(f"unknown sample image {name!r}; choose from {', '.join(SAMPLE_IMAGES)}")
        datasets = _need("sklearn.datasets")
        array = datasets.load_sample_image(f"{name}.jpg")
    elif isinstance(source, np.ndarray):
        array = source
    else:
        import os
        if not os.path.isfile(str(source)):
            raise FileNotFoundError(f"image not found: {str(source)!r}")
        array = np.asarray(Image.open(source).convert("RGB"))
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected an RGB image [H, W, 3], got shape {array.shape}")
    if array.dtype != np.uint8:
        array = np.clip(array * (255.0 if array.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
    h, w = array.shape[:2]
    scale = size / min(h, w)
    new = (max(32, round(w * scale)), max(32, round(h * scale)))
    return np.asarray(Image.fromarray(array).resize(new, Image.BICUBIC))


def to_tensor(image: np.ndarray, size: Optional[int] = None) -> torch.Tensor:
    """uint8 [H, W, 3] -> ImageNet-normalised float32 [1, 3, H, W]."""
    if size is not None and min(image.shape[:2]) != size:
        image = load_image(image, size)
    x = torch.from_numpy(np.array(image, copy=True)).permute(2, 0, 1).float() / 255.0
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return ((x - mean) / std)[None]


def plot_importance(image: np.ndarray, maps: Sequence[BlockImportance], out, title: Optional[str] = None,
                    max_blocks: int = 6, dpi: int = 100) -> str:
    """Draw ``image`` and, for up to ``max_blocks`` hybrid-scale blocks (spread
    over the stages), the importance map over the image (top row, relative to
    its mean, with a colour bar and each map's cv; near-uniform maps are named
    in the title) and the next self-guided block's reallocation (bottom row:
    fine = small groups of important tokens, coarse = large groups). Writes a
    PNG to ``out`` and returns its path."""
    plt = _need("matplotlib.pyplot")
    fig = importance_figure(image, maps, title, max_blocks)
    out = str(out)
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
    return out


def importance_figure(image: np.ndarray, maps: Sequence[BlockImportance], title: Optional[str] = None,
                      max_blocks: int = 6):
    """The matplotlib figure ``plot_importance`` writes."""
    matplotlib = _need("matplotlib")
    matplotlib.use("Agg", force=False)
    plt = _need("matplotlib.pyplot")
    chosen = _spread([m for m in maps if m.group_size is not None] or list(maps), max_blocks)
    cols = 1 + len(chosen)
    fig, axes = plt.subplots(2, cols, figsize=(2.1 * cols, 4.6), squeeze=False)
    # Every map relative to its own mean (1 = uniform), on one colour scale no
    # narrower than 1 +- 0.5: a near-uniform map stays one flat colour instead
    # of its noise being stretched over the whole colour map.
    relative = [m.importance[0].numpy() / m.importance[0].mean().item() for m in chosen]
    vmin = min([0.5] + [float(r.min()) for r in relative])
    vmax = max([1.5] + [float(r.max()) for r in relative])
    h, w = image.shape[:2]
    axes[0, 0].imshow(image)
    axes[0, 0].set_title("image\n(top row: importance)", fontsize=8)
    axes[1, 0].axis("off")
    axes[1, 0].text(0.02, 0.5, "reallocation\n(next self-guided\nblock):\n"
                    "light = fine\n(few tokens merged)\ndark = coarse\n(many merged)",
                    fontsize=8, va="center", transform=axes[1, 0].transAxes)
    shown = None
    for c, (m, rel) in enumerate(zip(chosen, relative), start=1):
        axes[0, c].imshow(image)
        shown = axes[0, c].imshow(_upsample(rel, h, w), cmap="jet", alpha=0.5, vmin=vmin, vmax=vmax)
        flag = ", near-uniform" if m.near_uniform else ""
        axes[0, c].set_title(f"{m.name}\ncv {m.cv:.3f}{flag}", fontsize=8)
        if m.group_size is not None:
            g = np.log2(m.group_size[0].numpy())
            axes[1, c].imshow(image)
            axes[1, c].imshow(_upsample(g, h, w), cmap="gray_r", alpha=0.65, vmin=0, vmax=max(g.max(), 1))
            sizes = sorted({int(s) for s in m.group_size[0].unique().tolist()})
            axes[1, c].set_title("groups of " + "/".join(str(s) for s in sizes), fontsize=8)
        else:
            axes[1, c].axis("off")
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    uniform = sum(m.near_uniform for m in chosen)
    if uniform:
        note = (f"{uniform} of {len(chosen)} maps near-uniform (cv = std/mean < {NEAR_UNIFORM_CV}): "
                "their colours and the reallocation follow noise")
        title = f"{title}\n{note}" if title else note
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    if shown is not None:
        bar = fig.colorbar(shown, ax=list(axes[0, 1:]), shrink=0.8, pad=0.01)
        bar.set_label("importance / mean", fontsize=8)
        bar.ax.tick_params(labelsize=7)
    return fig


def _spread(items, k):
    if len(items) <= k:
        return list(items)
    idx = np.linspace(0, len(items) - 1, k).round().astype(int)
    return [items[i] for i in sorted(set(idx.tolist()))]


def _upsample(grid: np.ndarray, h: int, w: int) -> np.ndarray:
    t = torch.from_numpy(np.ascontiguousarray(grid, dtype=np.float32))[None, None]
    return F.interpolate(t, size=(h, w), mode="nearest")[0, 0].numpy()


def visualize(image_source, out, model: Optional[torch.nn.Module] = None, checkpoint: Optional[str] = None,
              variant: str = "sgformer_s", size: int = 224, max_blocks: int = 6) -> dict:
    """Load an image, run ``model`` (or ``variant`` with weights from
    ``checkpoint``; random weights when neither is given), and write the
    picture to ``out``. Returns a summary: the PNG path, the blocks drawn, and
    per block the importance's coefficient of variation (std / mean; 0 for a
    uniform map), whether it is near-uniform (cv < ``NEAR_UNIFORM_CV``) and
    the share of importance mass in the top 10% of tokens."""
    from . import models
    image = load_image(image_source, size)
    if model is None:
        model = getattr(models, variant)(checkpoint_path=checkpoint).eval()
    maps = importance_maps(model, image)
    title = f"{variant}: " + (f"weights {checkpoint}" if checkpoint else "random weights (pass a checkpoint)")
    path = plot_importance(image, maps, out, title=title, max_blocks=max_blocks)
    summary = []
    for m in maps:
        v = m.importance[0].flatten().double()
        top = v.sort(descending=True).values[: max(1, v.numel() // 10)]
        summary.append(dict(block=m.name, tokens=v.numel(), cv=m.cv, near_uniform=m.near_uniform,
                            top10_share=(top.sum() / v.sum()).item()))
    return dict(path=path, image_shape=tuple(image.shape), blocks=summary)
