"""timm integration: registration, pretrained configs, the model API timm users
rely on, local pretrained files, features_only. Needs timm (extra [timm])."""
import importlib.util
import os
import subprocess
import sys
import warnings

import pytest
import torch

timm = pytest.importorskip("timm", reason="timm is not installed (pip install 'sgattn[timm]')")

import sgattn  # noqa: E402
from sgattn.models import load_checkpoint, save_safetensors, sgformer_s  # noqa: E402


def test_registered_with_pretrained_configs():
    assert {"sgformer_s", "sgformer_m", "sgformer_b"} <= set(timm.list_models("sgformer*"))
    model = timm.create_model("sgformer_s", num_classes=7)
    assert isinstance(model, sgattn.models.SGFormer)
    cfg = model.pretrained_cfg
    assert cfg["input_size"] == (3, 224, 224) and cfg["crop_pct"] == 0.9 and cfg["classifier"] == "head"
    assert cfg["mean"] == (0.485, 0.456, 0.406) and cfg["std"] == (0.229, 0.224, 0.225)
    assert isinstance(model.get_submodule(cfg["first_conv"]), torch.nn.Conv2d)
    data_cfg = timm.data.resolve_data_config({}, model=model)
    assert data_cfg["input_size"] == (3, 224, 224) and data_cfg["interpolation"] == "bicubic"
    assert model.num_features == 512 and model.get_classifier().out_features == 7


def test_registration_after_timm_is_imported_in_a_fresh_process():
    # import sgattn first, timm later: the models must still be registered
    code = ("import sgattn, sys; assert 'timm' not in sys.modules; import timm; "
            "print(timm.create_model('sgformer_m').num_features)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "512", r.stderr


def test_forward_features_head_and_reset_classifier():
    model = timm.create_model("sgformer_s", num_classes=5).eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (2, 512, 2, 3)  # unpooled
        pooled = model.forward_head(feats, pre_logits=True)
        torch.testing.assert_close(pooled, feats.mean(dim=(2, 3)))
        torch.testing.assert_close(model.forward_head(feats), model(x))
        model.reset_classifier(3)
        assert model(x).shape == (2, 3)
        model.reset_classifier(0)
        torch.testing.assert_close(model(x), pooled)
        model.reset_classifier(0, global_pool="")
        assert model(x).shape == (2, 512, 2, 3)


def test_features_only_and_forward_intermediates():
    fm = timm.create_model("sgformer_s", features_only=True, out_indices=(0, 2, 3)).eval()
    assert fm.feature_info.channels() == [64, 256, 512] and fm.feature_info.reduction() == [4, 16, 32]
    x = torch.randn(1, 3, 100, 75)
    with torch.no_grad():
        maps = fm(x)
        model = timm.create_model("sgformer_s").eval()
        model.load_state_dict(fm.model.state_dict(), strict=False)
        final, inter = model.forward_intermediates(x, indices=2)
    assert [tuple(m.shape) for m in maps] == [(1, 64, 25, 19), (1, 256, 7, 5), (1, 512, 4, 3)]
    assert [tuple(m.shape) for m in inter] == [(1, 256, 7, 5), (1, 512, 4, 3)]
    torch.testing.assert_close(final, inter[-1])
    torch.testing.assert_close(inter[0], maps[1])


def test_no_weight_decay_and_group_matcher_drive_timm_optimizers():
    model = timm.create_model("sgformer_s", num_classes=4)
    assert model.no_weight_decay() == {"pos_embed"}
    from timm.optim import create_optimizer_v2
    opt = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.8)
    scales = sorted({g["lr_scale"] for g in opt.param_groups})
    assert len(scales) > 20 and scales[-1] == 1.0  # one group per block depth, head at full lr
    decay = {id(p) for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert id(model.pos_embed) in decay
    from timm.models import group_parameters
    groups = group_parameters(model, model.group_matcher(coarse=True))
    # stem; stage 1's blocks (+ norm1); for stages 2-4 the embedding, then blocks (+ norm); head
    assert len(groups) == 1 + 1 + 3 * 2 + 1
    first = {n.split(".")[0]: gid for gid, names in groups.items() for n in reversed(names)}
    assert first["patch_embed1"] == 0 and first["block1"] == 1 and first["norm1"] == 1
    assert first["patch_embed2"] == 2 and first["block2"] == 3 and first["head"] == 8


def test_grad_checkpointing_gives_the_same_gradients(monkeypatch):
    from sgattn.models import sgformer as module
    calls = []

    def counting(fn, *args, **kwargs):
        calls.append(kwargs.get("use_reentrant"))
        return torch.utils.checkpoint.checkpoint(fn, *args, **kwargs)

    monkeypatch.setattr(module, "_checkpoint", counting)
    torch.manual_seed(0)
    model = timm.create_model("sgformer_s", num_classes=3, drop_path_rate=0.0).train()
    x = torch.randn(1, 3, 32, 48)
    model(x).square().sum().backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).square().sum().backward()
    assert calls == [False] * sum(model.depths)  # every block, non-reentrant
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[n], rtol=1e-5, atol=1e-6, msg=n)


def test_pretrained_from_local_files_in_the_authors_layouts(tmp_path):
    torch.manual_seed(0)
    source = sgformer_s().eval()
    state = source.state_dict()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = source(x)
    files = {"ema.pth": {"state_dict_ema": state, "epoch": 300},
             "ddp.pth": {"state_dict": {"module." + k: v for k, v in state.items()}}}
    for name, content in files.items():
        torch.save(content, tmp_path / name)
    save_safetensors(source, tmp_path / "w.safetensors")
    for name in list(files) + ["w.safetensors"]:
        model = timm.create_model("sgformer_s", pretrained=True,
                                  pretrained_cfg_overlay=dict(file=str(tmp_path / name))).eval()
        with torch.no_grad():
            torch.testing.assert_close(model(x), expected, rtol=0, atol=0, msg=name)
    # a 10-class fine-tuning model keeps everything but the classifier
    model = timm.create_model("sgformer_s", pretrained=True, num_classes=10,
                              pretrained_cfg_overlay=dict(file=str(tmp_path / "ema.pth")))
    assert torch.equal(model.pos_embed, source.pos_embed) and model.head.out_features == 10
    # features_only through timm loads too (the classifier is dropped)
    fm = timm.create_model("sgformer_s", pretrained=True, features_only=True,
                           pretrained_cfg_overlay=dict(file=str(tmp_path / "w.safetensors")))
    assert torch.equal(fm.model.block3[5].attn.q.weight, source.block3[5].attn.q.weight)


def test_missing_or_absent_pretrained_file_is_a_clear_error(tmp_path):
    missing = str(tmp_path / "nope.pth")
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        timm.create_model("sgformer_s", pretrained=True, pretrained_cfg_overlay=dict(file=missing))
    with pytest.raises(ValueError, match="pretrained_cfg_overlay=dict\\(file="):
        timm.create_model("sgformer_s", pretrained=True)
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        sgformer_s(checkpoint_path=missing)
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_checkpoint(sgformer_s(), missing)


def test_fx_feature_extraction_matches_the_feature_getter():
    # timm's fx feature wrapper traces the model with timm's notrace registry (the attention modules
    # and the position-embedding resampling are leaves) and takes the maps from the stage norms
    models = {}
    for cls in ("getter", "fx"):
        torch.manual_seed(0)  # the same weights
        models[cls] = timm.create_model("sgformer_s", features_only=True, out_indices=(0, 2, 3), feature_cls=cls)
    assert type(models["fx"]).__name__ == "FeatureGraphNet"
    x = torch.randn(1, 3, 72, 104)  # not 224: the embedding is resampled inside the traced graph
    with torch.no_grad():
        for a, b in zip(models["fx"].eval()(x), models["getter"].eval()(x), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    model = timm.create_model("sgformer_s", num_classes=5).eval()
    traced = timm.models.create_feature_extractor(model, {"norm2": "s2", "head": "logits"}).eval()
    with torch.no_grad():
        out = traced(x)
        torch.testing.assert_close(out["s2"], model.forward_stages(x)[1], rtol=0, atol=0)
        torch.testing.assert_close(out["logits"], model(x), rtol=0, atol=0)


def test_torchscript_is_refused_with_the_reason():
    with pytest.raises(RuntimeError, match="does not support TorchScript.*torch.compile"):
        torch.jit.script(timm.create_model("sgformer_s", features_only=True))


# ---- timm's own tests that select models by timm's module list (sgattn's is not in it), called with
# sgformer's names. They come from timm's source release for the installed timm, unpacked by
# tools/run_timm_tests.sh (which .ci/run calls, setting SGATTN_TIMM_TESTS_DIR); nothing is copied.

@pytest.fixture(scope="module")
def timm_model_tests():
    root = os.environ.get("SGATTN_TIMM_TESTS_DIR")
    if not root:
        pytest.skip("SGATTN_TIMM_TESTS_DIR is not set: tools/run_timm_tests.sh DIR downloads timm's source "
                    "release into DIR (CI sets it)")
    path = os.path.join(root, "tests", "test_models.py")
    assert os.path.isfile(path), f"SGATTN_TIMM_TESTS_DIR={root!r} holds no tests/test_models.py"
    with open(os.path.join(root, "PKG-INFO")) as f:
        release = next(line.split()[1] for line in f if line.startswith("Version:"))
    assert release == timm.__version__, f"timm {release}'s tests in {root!r}, but timm {timm.__version__} installed"
    spec = importlib.util.spec_from_file_location("timm_release_test_models", path)
    module = importlib.util.module_from_spec(spec)
    with warnings.catch_warnings():  # its markers (base, features, timeout...) are registered in timm's config only
        warnings.simplefilter("ignore", pytest.PytestUnknownMarkWarning)
        spec.loader.exec_module(module)  # by path: its directory is not on sys.path, the installed timm is tested
    return module


@pytest.mark.parametrize("name", ["sgformer_s", "sgformer_m", "sgformer_b"])
@pytest.mark.parametrize("test", ["test_model_forward_intermediates", "test_model_forward_intermediates_features"])
def test_timm_forward_intermediates_tests(timm_model_tests, test, name):
    getattr(timm_model_tests, test)(name, batch_size=1)


# sgformer_s only: m and b have its layers, deeper or wider (1-2 minutes more each on 2 cores, no new code)
def test_timm_prune_intermediate_layers_contract(timm_model_tests):
    timm_model_tests.test_prune_intermediate_layers_contract("sgformer_s")
