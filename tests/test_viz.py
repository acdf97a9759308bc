"""Importance pictures: on a real photograph shipped with scikit-learn and on a
generated image; the PNG's size, a map that is not uniform, the reallocation."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("matplotlib", reason="pictures need matplotlib (pip install 'sgattn[viz]')")
PIL = pytest.importorskip("PIL.Image", reason="pictures need Pillow (pip install 'sgattn[viz]')")
pytest.importorskip("sklearn", reason="the sample photograph comes with scikit-learn (pip install 'sgattn[viz]')")

from sgattn import viz  # noqa: E402
from sgattn.models import sgformer_s  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return sgformer_s().eval()


def test_photograph_maps_and_png(model, tmp_path):
    image = viz.load_image("sample:china", size=96)
    assert image.dtype == np.uint8 and min(image.shape[:2]) == 96
    maps = viz.importance_maps(model, image)
    assert len(maps) == 1 + 2 + 8  # sgformer_s: hybrid-scale blocks in stages 1, 2, 3
    first = maps[0]
    assert first.importance.shape == (1, 24, 36)
    imp = first.importance[0]
    assert (imp.std() / imp.mean()).item() > 1e-3  # differs from a uniform map
    # reallocation of the next self-guided block (sr 8): a quarter coarse (196), half 56, a quarter fine (28)
    sizes, counts = first.group_size[0].unique(return_counts=True)
    assert sizes.tolist() == [28.0, 56.0, 196.0]
    n = imp.numel()
    assert counts.tolist() == [n - 3 * (n // 4), 2 * (n // 4), n // 4]
    assert imp[first.group_size[0] == 28].min() >= imp[first.group_size[0] == 196].max()  # fine = important
    out = viz.plot_importance(image, maps, tmp_path / "p.png", max_blocks=4, dpi=50)
    with PIL.open(out) as png:
        assert png.size == (round(2.1 * 5 * 50), round(4.6 * 50))


def test_generated_image_through_the_command(tmp_path):
    # a generated image: a bright disc on a gradient
    yy, xx = np.mgrid[0:80, 0:120]
    img = np.stack([xx / 120 * 255, yy / 80 * 255, 255 * (((yy - 40) ** 2 + (xx - 70) ** 2) < 300)], -1)
    src = tmp_path / "gen.png"
    PIL.fromarray(img.astype(np.uint8)).save(src)
    out = tmp_path / "viz.png"
    r = subprocess.run([sys.executable, "-m", "sgattn", "viz", str(src), "--out", str(out), "--size", "64",
                        "--blocks", "3"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "random weights" in r.stdout and "stage 1 block 0" in r.stdout
    with PIL.open(out) as png:
        assert png.size == (round(2.1 * 4 * 100), round(4.6 * 100))
    cvs = [float(line.split("cv ")[1].split()[0]) for line in r.stdout.splitlines() if " cv " in line]
    assert len(cvs) == 11 and max(cvs) > 1e-3
    # random weights give near-uniform maps in the deeper blocks, and the command says so per block and overall
    flagged = [line.endswith("near-uniform") for line in r.stdout.splitlines() if " cv " in line]
    assert flagged == [cv < viz.NEAR_UNIFORM_CV for cv in cvs]
    assert any(flagged) and f"{sum(flagged)} of 11 maps are near-uniform" in r.stdout


def test_figure_has_a_colour_bar_and_names_near_uniform_maps():
    image = np.zeros((64, 64, 3), dtype=np.uint8)
    yy, xx = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    structured = (1.0 + (xx + yy))[None]                     # cv ~0.5: real structure
    flat = 1.0 + 1e-3 * torch.sin(xx + 2 * yy)[None]         # cv ~7e-4: noise around a uniform map
    maps = [viz.BlockImportance(1, 0, structured, viz.group_sizes(structured, 8)),
            viz.BlockImportance(1, 1, flat, viz.group_sizes(flat, 8))]
    assert not maps[0].near_uniform and maps[1].near_uniform
    assert maps[1].cv == pytest.approx((flat.double().std() / flat.double().mean()).item())
    fig = viz.importance_figure(image, maps, title="t")
    titles = [ax.get_title() for ax in fig.axes]
    assert f"stage 1 block 0\ncv {maps[0].cv:.3f}" in titles
    assert f"stage 1 block 1\ncv {maps[1].cv:.3f}, near-uniform" in titles
    assert "1 of 2 maps near-uniform" in fig._suptitle.get_text()
    bars = [ax for ax in fig.axes if ax.get_ylabel() == "importance / mean"]
    assert len(bars) == 1
    # one colour scale, no narrower than 1 +- 0.5 of the mean: the flat map cannot fill it
    images = [ax.get_images()[1] for ax in fig.axes[1:3]]
    assert images[0].get_clim() == images[1].get_clim()
    lo, hi = images[1].get_clim()
    assert lo <= 0.5 and hi >= 1.5 and (flat / flat.mean()).max() < 1.01


def test_missing_image_is_a_clear_error(tmp_path):
    r = subprocess.run([sys.executable, "-m", "sgattn", "viz", str(tmp_path / "none.jpg"), "--out",
                        str(tmp_path / "x.png")], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 1 and "none.jpg" in r.stderr
