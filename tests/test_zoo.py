from __future__ import annotations

import json

import pytest
import timm
import torch
from torch import nn

from mpsearch.data import DatasetInfo
from mpsearch.errors import UserError
from mpsearch.zoo import create_model, get_baseline, resolve_model_name, sha256_file

FMNIST_INFO = DatasetInfo("fashion-mnist", 10, 1, 28, (0.286,), (0.353,))


def test_small_image_resnet_gets_a_stride_one_stem_and_no_maxpool():
    m = create_model("resnet18", FMNIST_INFO)
    assert isinstance(m.conv1, nn.Conv2d) and m.conv1.kernel_size == (3, 3) and m.conv1.stride == (1, 1)
    assert isinstance(m.maxpool, nn.Identity)
    feats = m.forward_features(torch.zeros(1, 1, 28, 28))
    assert feats.shape == (1, 512, 4, 4)  # layer4 at 4x4, not 1x1
    deep = create_model("test_resnet", FMNIST_INFO)  # deep stem: first conv made stride 1
    assert deep.conv1[0].stride == (1, 1)


def test_large_images_keep_the_imagenet_stem():
    m = create_model("resnet18", DatasetInfo("x", 5, 3, 224, (0.5,) * 3, (0.5,) * 3))
    assert m.conv1.stride == (2, 2) and isinstance(m.maxpool, nn.MaxPool2d)


def test_small_image_vit_uses_a_7x7_patch_grid():
    m = create_model("deit_tiny", FMNIST_INFO)
    assert m.patch_embed.proj.kernel_size == (4, 4)
    assert m.patch_embed.num_patches == 49
    assert m(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_unknown_model_is_a_user_error():
    with pytest.raises(UserError, match="unknown model 'resnet1800'"):
        resolve_model_name("resnet1800")
    assert resolve_model_name("deit_tiny") == "deit_tiny_patch16_224"


def test_pretrained_without_network_says_how_to_proceed(monkeypatch):
    real = timm.create_model

    def offline(name, pretrained=False, **kw):
        if pretrained:
            raise OSError("Couldn't connect to huggingface.co")
        return real(name, pretrained=False, **kw)

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(UserError, match="--pretrained needs internet access.*--checkpoint PATH"):
        create_model("resnet18", FMNIST_INFO, pretrained=True)


def test_baseline_is_trained_once_then_loaded_from_cache(digits, digits_recipe, digits_baseline):
    meta = digits_baseline.meta
    assert meta["test_accuracy"] > 0.85 and meta["val_accuracy"] > 0.85
    assert meta["sha256"] == digits_baseline.sha256
    assert set(meta["versions"]) >= {"torch", "timm", "python"}
    assert meta["recipe"] == digits_recipe.to_dict()
    messages = []
    again = get_baseline("test_resnet", digits, recipe=digits_recipe, seed=0, progress=False, log=messages.append)
    assert messages == []  # no "training one now"
    assert again.sha256 == digits_baseline.sha256
    for k, v in digits_baseline.model.state_dict().items():
        assert torch.equal(v, again.model.state_dict()[k])


def test_checkpoint_flag_loads_weights_only_and_rejects_bad_files(tmp_path, digits, digits_baseline):
    path = tmp_path / "ck.pt"
    torch.save(digits_baseline.model.state_dict(), path)
    loaded = get_baseline("test_resnet", digits, checkpoint=path)
    assert loaded.sha256 == sha256_file(path)
    x = next(digits.val.batches(8))[0]
    assert torch.equal(loaded.model(x), digits_baseline.model.eval()(x))
    with pytest.raises(UserError, match="does not fit model 'resnet18'"):
        get_baseline("resnet18", digits, checkpoint=path)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="not a readable PyTorch state dict"):
        get_baseline("test_resnet", digits, checkpoint=corrupt)
    with pytest.raises(UserError, match="file not found"):
        get_baseline("test_resnet", digits, checkpoint=tmp_path / "missing.pt")

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    evil = tmp_path / "evil.pt"
    torch.save({"w": Evil()}, evil)
    with pytest.raises(UserError):  # weights_only=True refuses arbitrary pickles
        get_baseline("test_resnet", digits, checkpoint=evil)


def test_corrupt_cached_checkpoint_is_detected(digits, digits_recipe, digits_baseline):
    path = digits_baseline.checkpoint
    original = path.read_bytes()
    try:
        path.write_bytes(original[:-10] + b"0123456789")
        with pytest.raises(UserError, match="sha256 mismatch"):
            get_baseline("test_resnet", digits, recipe=digits_recipe, seed=0, progress=False)
    finally:
        path.write_bytes(original)
    assert json.loads((path.parent / "meta.json").read_text())["sha256"] == digits_baseline.sha256
