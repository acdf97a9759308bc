"""The evolving-importance demo, shortened: after a few dozen training steps the
share of importance inside the digit's box rises well above its start."""
import json

import pytest

pytest.importorskip("sklearn", reason="the demo's digits come with scikit-learn (pip install 'sgattn[viz]')")
pytest.importorskip("matplotlib", reason="the demo's PNG needs matplotlib (pip install 'sgattn[viz]')")

from sgattn import demo  # noqa: E402


def test_importance_share_inside_the_object_rises(tmp_path):
    result = demo.run(steps=60, batch=32, seed=0, out_dir=str(tmp_path), eval_images=32, measure_every=30)
    before, after = result["before"], result["after"]
    # untrained: about what a uniform map gives (the box's area share)
    assert 0.7 < before["concentration"] < 1.3, before
    assert after["share"] > before["share"] + 0.03, (before, after)
    assert after["concentration"] > 1.15, after
    assert max(after["per_block"]) > 1.5 * after["area_share"]  # the deepest block concentrates most
    assert result["accuracy"] > 0.5  # it learned the task (4 classes: chance is 0.25)
    png = tmp_path / "importance_evolution.png"
    assert png.stat().st_size > 10_000
    saved = json.loads((tmp_path / "importance_evolution.json").read_text())
    assert saved["after"]["share"] == pytest.approx(after["share"])


def test_boxes_and_labels_of_the_task():
    import torch
    images, labels = demo._digits()
    x, y, boxes = demo.make_batch(images, labels, 16, torch.Generator().manual_seed(3))
    assert x.shape == (16, 3, demo.CANVAS, demo.CANVAS)
    centre_y = (boxes[:, 0] + boxes[:, 2]) // 2
    centre_x = (boxes[:, 1] + boxes[:, 3]) // 2
    assert torch.equal(y, 2 * (centre_y >= 32).long() + (centre_x >= 32).long())
    # the digit's strokes lie inside its box: the image differs from a canvas drawn without it
    assert ((boxes[:, 2] - boxes[:, 0]) == demo.DIGIT).all()
