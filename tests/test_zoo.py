from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import timm
import torch
from torch import nn

from mpsearch.data import DatasetInfo
from mpsearch.errors import UserError
from mpsearch.models.zoo import _build, create_model, get_baseline, resolve_model_name, sha256_file

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


def test_other_families_keep_at_most_8_fold_reduction_on_small_images():
    convnext = create_model("test_convnext", FMNIST_INFO)
    stem = convnext.stem[0]  # the 4x4 stride-4 patchify stem: a 5x5 stride-1 conv, same size
    assert stem.kernel_size == (5, 5) and stem.stride == (1, 1) and stem.padding == (2, 2)
    assert convnext.forward_features(torch.zeros(1, 1, 28, 28)).shape[-2:] == (3, 3)  # 28 -> 28, 14, 7, 3
    effnet = create_model("test_efficientnet", FMNIST_INFO)
    assert effnet.conv_stem.stride == (1, 1) and effnet.forward_features(torch.zeros(1, 1, 28, 28)).shape[-2:] == (4, 4)
    big = create_model("test_efficientnet", DatasetInfo("x", 5, 3, 224, (0.5,) * 3, (0.5,) * 3))
    assert big.conv_stem.stride == (2, 2)  # large images: timm's network as it is


def test_small_image_adaptation_keeps_what_a_seed_initializes():
    """The adaptation probes a model without drawing random numbers of its own: a seed gives the
    weights timm's factory gives (the cached baselines depend on it)."""
    torch.manual_seed(0)
    adapted = create_model("test_efficientnet", FMNIST_INFO).state_dict()
    torch.manual_seed(0)
    plain = timm.create_model("test_efficientnet", num_classes=10, in_chans=1).state_dict()
    assert adapted.keys() == plain.keys() and all(torch.equal(adapted[k], plain[k]) for k in plain)


def test_a_model_that_cannot_run_on_the_images_is_refused_with_the_sizes_it_runs_on():
    with pytest.raises(UserError) as refused:
        create_model("test_maxvit", FMNIST_INFO)
    message = str(refused.value)
    assert "\n" not in message and "model test_maxvit cannot run on 28 px images" in message
    assert "it runs on 8, 16, 24, 32, 40, 48, 56, 64 px images" in message
    assert create_model("test_maxvit", DatasetInfo("x", 10, 1, 32, (0.5,), (0.5,)))(torch.zeros(1, 1, 32, 32)).shape == (1, 10)


def test_recipes_by_family():
    from mpsearch.config import TrainConfig
    from mpsearch.models.zoo import CONVNET_ADAMW_RECIPE, VIT_RECIPE, default_recipe, model_family

    assert default_recipe("resnet18") == TrainConfig() and default_recipe("test_resnet").optimizer == "sgd"
    assert default_recipe("deit_tiny") is VIT_RECIPE and default_recipe("test_vit_relpos") is VIT_RECIPE
    assert default_recipe("mobilenetv3_small_100") is CONVNET_ADAMW_RECIPE and CONVNET_ADAMW_RECIPE.optimizer == "adamw"
    assert default_recipe("test_convnext") is CONVNET_ADAMW_RECIPE
    assert default_recipe("test_maxvit").image_scales == (1.0,)  # attention sized for one input size
    # A small training set (digits: 1,257 images) trains every epoch at native size on every image.
    assert default_recipe("lcnet_050", train_images=1257) == replace(CONVNET_ADAMW_RECIPE, image_scales=(1.0,), keep_fraction=1.0)
    assert default_recipe("lcnet_050", train_images=50_000) is CONVNET_ADAMW_RECIPE
    assert default_recipe("resnet18", train_images=9_999).keep_fraction == 1.0 == default_recipe("resnet18").keep_fraction * 2
    assert model_family("efficientnet_b0") == "efficientnet"


def test_a_baseline_trains_on_every_core_and_says_how_long_it_will_take(digits, messages, monkeypatch):
    import mpsearch.models.zoo as zoo
    from mpsearch.config import TrainConfig
    from mpsearch.host.machine import available_cores

    seen = []
    real = zoo.train_model

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(zoo, "train_model", spy)
    monkeypatch.setattr(zoo, "available_cores", lambda: 2)  # as on a 2-core machine, whatever this one has
    torch.set_num_threads(1)
    try:
        get_baseline("test_resnet", digits, recipe=TrainConfig(epochs=2, batch_size=32, bf16=False), seed=5, progress=False)
        assert torch.get_num_threads() == 1  # the caller's setting is back
    finally:
        torch.set_num_threads(min(2, available_cores()))
    assert seen == [2]
    assert any("training one now on all 2 cores" in m for m in messages)
    assert any(m.startswith("training: expected about") and "min" in m for m in messages)


def test_training_that_diverges_is_refused_in_one_line(digits):
    from mpsearch.config import TrainConfig

    with pytest.raises(UserError, match="diverged: the trained model outputs NaN/inf"):
        get_baseline("test_resnet", digits, recipe=TrainConfig(epochs=1, lr=1e9, label_smoothing=0.0, bf16=False),
                     seed=3, progress=False)


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
    with pytest.raises(UserError, match="pretrained weights need internet access.*use a checkpoint file"):
        create_model("resnet18", FMNIST_INFO, pretrained=True)


def test_baseline_is_trained_once_then_loaded_from_cache(digits, digits_recipe, digits_baseline, messages):
    meta = digits_baseline.meta
    assert meta["test_accuracy"] > 0.85 and meta["val_accuracy"] > 0.85
    assert meta["sha256"] == digits_baseline.sha256
    assert set(meta["versions"]) >= {"torch", "timm", "python"}
    assert meta["recipe"] == digits_recipe.to_dict()
    again = get_baseline("test_resnet", digits, recipe=digits_recipe, seed=0, progress=False)
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


def test_selective_epochs_draw_hard_images_most_and_every_image_sometimes():
    from mpsearch.models.train import _pick_by_loss

    n, keep, draws = 1000, 500, 200
    losses = torch.linspace(0.0, 3.0, n)[torch.randperm(n, generator=torch.Generator().manual_seed(1))]
    order = losses.argsort()  # easiest first
    hits = torch.zeros(n)
    gen = torch.Generator().manual_seed(0)
    for _ in range(draws):
        picked = _pick_by_loss(losses, keep, gen)
        assert len(picked) == keep and len(set(picked.tolist())) == keep
        hits[picked] += 1
    rate = hits / draws
    # Inclusion rises with the loss rank, monotone by tenths: with half kept the hardest tenth
    # is drawn about 78 % of the time, the easiest about 7 % (rarely, but not never).
    assert 0.7 < rate[order[-100:]].mean() < 0.86
    assert 0.03 < rate[order[:100]].mean() < 0.12
    deciles = [float(rate[order[k : k + 100]].mean()) for k in range(0, n, 100)]
    assert deciles == sorted(deciles)
    same = _pick_by_loss(losses, keep, torch.Generator().manual_seed(5))
    assert torch.equal(same, _pick_by_loss(losses, keep, torch.Generator().manual_seed(5)))


def test_batch_norm_statistics_are_re_estimated_over_the_sample(digits):
    from mpsearch.config import TrainConfig
    from mpsearch.models.train import _recalibrate_batch_norm

    torch.manual_seed(0)
    model = create_model("test_resnet", digits.info).train()
    recipe = TrainConfig(batch_norm_images=512, bf16=False, channels_last=False)
    first_conv, first_norm = model.conv1[0], model.conv1[1]  # test_resnet's deep stem: conv, then batch norm
    first_norm.running_mean.fill_(7.0)
    _recalibrate_batch_norm(model, digits.train, recipe, torch.device("cpu"), torch.contiguous_format,
                            torch.Generator().manual_seed(3), progress=False)
    # The same 512 images, drawn again: two equal batches, so the cumulative average of batch
    # means is the mean over all of them.
    sample = digits.train.select(torch.randperm(len(digits.train), generator=torch.Generator().manual_seed(3))[:512])
    x = torch.cat([x for x, _ in sample.batches(512)])
    with torch.no_grad():
        expected = first_conv(x).mean(dim=(0, 2, 3))
    assert torch.allclose(first_norm.running_mean, expected, atol=1e-5)
    assert int(first_norm.num_batches_tracked) == 2
    assert first_norm.momentum == 0.1  # restored


def test_selective_training_takes_the_scheduled_steps_and_learns(digits):
    from mpsearch.config import TrainConfig
    from mpsearch.evaluation.metrics import correct_mask
    from mpsearch.models.train import train_model

    recipe = TrainConfig(epochs=8, batch_size=64, lr=0.05, label_smoothing=0.0, keep_fraction=0.5, bf16=False,
                         channels_last=False, image_scales=(1.0,), batch_norm_images=256)
    torch.manual_seed(0)
    model = create_model("test_resnet", digits.info)
    steps = []
    model.register_forward_pre_hook(lambda m, args: steps.append(args[0].shape[0]) if m.training and torch.is_grad_enabled() else None)
    train_model(model, digits.train, digits.info, recipe, progress=False)
    n = len(digits.train)
    half = recipe.epoch_images(1, n)
    assert half == round(n / 2) and recipe.epoch_images(0, n) == n
    assert sum(steps) == n + 7 * half  # one full epoch, then seven on half of the images
    assert len(steps) == -(-n // 64) + 7 * -(-half // 64)
    accuracy = float(correct_mask(model.to(memory_format=torch.channels_last), digits.val).float().mean())
    assert accuracy > 0.9
    with pytest.raises(UserError, match="recipe.keep_fraction"):
        TrainConfig(keep_fraction=0.0)


def test_one_epoch_of_four_steps_trains_with_a_warm_up(digits):
    """One epoch of 4 steps at the recipe's 0.25 warm-up would give OneCycleLR a warm-up of one
    step, which it divides by zero for: the warm-up is stretched to two steps."""
    from mpsearch.config import TrainConfig
    from mpsearch.models.train import _warmup_fraction, train_model

    assert _warmup_fraction(0.25, 4) == 0.5 and _warmup_fraction(0.25, 40) == 0.25 and _warmup_fraction(0.25, 1) == 0.9
    recipe = TrainConfig(epochs=1, batch_size=128, bf16=False, image_scales=(1.0,))
    model = create_model("test_resnet", digits.info)
    before = [p.detach().clone() for p in model.parameters()]
    train_model(model, digits.train.subset(512), digits.info, recipe, progress=False)
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("native", [False, True])
def test_bf16_autocast_only_where_the_cpu_runs_bf16(digits, monkeypatch, native):
    """recipe.bf16 trains under bf16 autocast on a CPU with bf16 instructions and in fp32 (bit for
    bit what bf16=False trains) on one without, where emulated bf16 is 15x slower than fp32."""
    import mpsearch.models.train as train
    from mpsearch.config import TrainConfig

    monkeypatch.setattr(train, "native_bf16", lambda device_type: None if native else "no bf16 here")
    autocast_dtypes = []
    hook = lambda m, args, out: autocast_dtypes.append(out.dtype) if m.training else None  # noqa: E731

    def trained(bf16: bool):
        recipe = TrainConfig(epochs=1, batch_size=64, lr=0.05, bf16=bf16, channels_last=False, image_scales=(1.0,),
                             keep_fraction=1.0)
        torch.manual_seed(0)
        model = create_model("test_resnet", digits.info)
        handle = model.conv1.register_forward_hook(hook)
        train.train_model(model, digits.train, digits.info, recipe, progress=False)
        handle.remove()
        return model.state_dict()

    fp32 = trained(False)
    assert set(autocast_dtypes) == {torch.float32}
    autocast_dtypes.clear()
    asked = trained(True)
    assert set(autocast_dtypes) == ({torch.bfloat16} if native else {torch.float32})
    same = all(torch.equal(fp32[k], asked[k]) for k in fp32)
    assert same != native


def test_a_baseline_trained_without_bf16_says_so_and_records_it(digits, monkeypatch, messages):
    import mpsearch.models.train as train
    import mpsearch.models.zoo as zoo
    from mpsearch.config import TrainConfig

    monkeypatch.setattr(zoo, "native_bf16", lambda device_type: "no bf16 here")
    monkeypatch.setattr(train, "native_bf16", lambda device_type: "no bf16 here")
    recipe = TrainConfig(epochs=1, batch_size=64, lr=0.05, bf16=True, channels_last=False, image_scales=(1.0,),
                         keep_fraction=1.0, batch_norm_images=128)
    baseline = zoo.get_baseline("test_resnet", digits, recipe=recipe, seed=3, progress=False)
    assert "Training in fp32 instead of bf16 autocast: no bf16 here." in messages
    assert baseline.meta["autocast"] == "fp32"
    assert json.loads((baseline.checkpoint.parent / "meta.json").read_text())["autocast"] == "fp32"


def test_a_fixed_resolution_attention_model_trains_at_every_size_its_recipe_feeds_on_digits(digits):
    """LeViT's attention biases are sized for one token grid: its family recipe's progressive
    resizing (5 px images at 8 px) would crash it, so it trains at its one size; one training step
    at each size the recipe feeds, then an eval forward, all run."""
    from mpsearch.models.zoo import default_recipe, training_recipe

    torch.manual_seed(0)
    model = create_model("levit_128s", digits.info)
    recipe = default_recipe("levit_128s")
    assert len(set(recipe.image_scales)) > 1  # the family recipe resizes ...
    fitted = training_recipe("levit_128s", model, recipe, digits.info)
    sizes = sorted({fitted.image_size(epoch, 8) for epoch in range(fitted.epochs)})
    assert sizes == [8] and fitted.image_scales == (1.0,) and fitted.lr == recipe.lr  # ... this model trains at 8 px only
    optimizer = torch.optim.AdamW(model.parameters(), lr=fitted.lr)
    x, y = next(iter(digits.train.batches(16)))
    model.train()
    for size in sizes:
        loss = nn.functional.cross_entropy(model(nn.functional.interpolate(x, size=size)), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        assert torch.isfinite(loss)
    with torch.no_grad():
        assert model.eval()(x).shape == (16, 10)
    resnet = create_model("test_resnet", digits.info)  # a model that runs at every size keeps its recipe
    assert training_recipe("test_resnet", resnet, default_recipe("test_resnet"), digits.info) == default_recipe("test_resnet")


@pytest.mark.parametrize("name, changes", [
    ("crossvit_tiny_240", []),  # two branches at 28 and 26 px: a patch size for each (4 and 2)
    ("twins_pcpvt_small", ["patch_embeds.0.proj: stride-4 4x4 conv -> 5x5 stride-1"]),  # built at 224 px, not sized for 28
    ("efficientformer_l1", ["stem.conv1: stride 1", "stem.conv2: stride 1", "stages.1.downsample.conv: stride 1"]),
    ("gmlp_ti16_224", ["built for 112 px, its 16 px patches re-cut to 4 px"]),  # its factory fixes 16 px patches
    ("visformer_tiny", ["stem.0: stride 1", "patch_embed1.proj: stride-4 4x4 conv -> 5x5 stride-1"]),  # positions sized at 224 px
    ("vit_tiny_r_s16_p8_224", ["built for 28 px with 1 px patches"]),  # its backbone leaves a 7x7 map: patches of 4 and 2 do not divide it
    ("tnt_s_legacy_patch16_224", ["built for 28 px with 4 px patches"]),  # its embedding is pixel_embed, not patch_embed
])
def test_models_whose_constructor_takes_an_image_size_run_on_28_px(name, changes):
    """Rules beyond CoAtNet/MaxViT's: a patch size per branch; timm's own size where a model only
    checks that its size divides into patches (its token count follows the changed patch
    embedding) or sizes its positional tables for the steps that remain (Visformer: timm's
    PatchEmbed no longer checks the size it was built for); a 224 px probe and fewer downsampling
    steps where the last stage's attention is sized for a 7x7 grid (EfficientFormer reduces 28 px
    4-fold); a patch embedding re-cut where the factory fixes the patch size (the MLP-Mixers'
    ``stem``); smaller patches where the grid must divide further (a hybrid ViT) or the embedding
    has another name (TNT)."""
    model, made = _build(name, FMNIST_INFO)
    assert made[: len(changes)] == changes
    if name == "crossvit_tiny_240":
        assert [embed.patch_size for embed in model.patch_embed] == [(4, 4), (2, 2)]
        assert [embed.img_size for embed in model.patch_embed] == [(28, 28), (26, 26)]
    if name == "twins_pcpvt_small":
        assert model.patch_embeds[0].patch_size == (1, 1)  # 28x28 tokens, counted as the conv makes them
    if name == "visformer_tiny":
        assert model.patch_embed1.patch_size == (1, 1) and not model.patch_embed1.strict_img_size
        assert tuple(model.pos_embed3.shape[-2:]) == (7, 7)  # 28 px reduced 4-fold
    assert model.eval()(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_a_constructor_that_rejects_every_size_is_a_one_line_refusal():
    """CrossViT's dagger variants build their patch embedding for 12 or 16 px patches only: the
    constructor's own failure is one line, not a traceback."""
    with pytest.raises(UserError) as refused:
        create_model("crossvit_9_dagger_240", FMNIST_INFO)
    message = str(refused.value)
    assert "\n" not in message and "cannot run on 28 px images (AttributeError" in message
    assert "it runs on no size from 8 to 64 px" in message


def test_an_unknown_failure_inside_a_model_is_one_line_naming_model_and_stage():
    from mpsearch.errors import model_stage

    with pytest.raises(UserError) as failed:
        with model_stage("mymodel", "training its baseline"):
            raise RuntimeError("shape mismatch\nsecond line")
    assert str(failed.value).startswith("model mymodel failed while training its baseline (RuntimeError: shape mismatch)")
    assert "\n" not in str(failed.value) and isinstance(failed.value.__cause__, RuntimeError)  # --debug shows it
    with pytest.raises(UserError, match="^bad input$"), model_stage("mymodel", "training"):
        raise UserError("bad input")  # mpsearch's own one-liners pass through unchanged


@pytest.mark.slow
def test_the_zoo_sweep_runs_a_family_and_writes_its_table(tmp_path, cache_dir):
    """scripts/sweep_zoo.py as docs/compatibility.md was written, on one family and size: the
    model it picks (the smallest variant), a cell through build, training and eval in its own
    process, and the counts table."""
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "compat.md"
    done = subprocess.run([sys.executable, str(root / "scripts" / "sweep_zoo.py"), "--families", "levit", "--sizes", "8",
                           "--stages", "build,train,eval", "--out", str(out)], cwd=root, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    text = out.read_text()
    assert "| 8 px | 1 | 1 | 0 | 0 | 0 |" in text  # families, end to end, refused, crashed, not run
    assert "| levit | `levit_128s` (7.78 M) | ✓ end to end (eval) |" in text  # on digits every family trains at 8 px
    assert json.loads(out.with_suffix(".json").read_text())["levit@8"]["stages"][0][:2] == ["build", "ok"]
