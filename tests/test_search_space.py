"""Search spaces: the shipped YAML files, the integer-vector encoding, and one-line errors."""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from mpsearch.algorithms.space import SPACES_DIR, BoundSpace, SearchSpace, available_spaces, default_space_for
from mpsearch.errors import UserError
from mpsearch.policy import LayerPrecision, uniform_policy


def resnet18_layers() -> list[str]:
    """The 21 quantizable layers of ResNet-18, in execution order (downsample after conv2)."""
    names = ["conv1"]
    for stage in range(1, 5):
        for block in range(2):
            names += [f"layer{stage}.{block}.conv1", f"layer{stage}.{block}.conv2"]
            if stage > 1 and block == 0:
                names.append(f"layer{stage}.0.downsample.0")
    return names + ["fc"]


def vit_layers(depth: int = 12) -> list[str]:
    names = ["patch_embed.proj"]
    for i in range(depth):
        names += [f"blocks.{i}.attn.qkv", f"blocks.{i}.attn.proj", f"blocks.{i}.mlp.fc1", f"blocks.{i}.mlp.fc2"]
    return names + ["head"]


R18 = resnet18_layers()
W8A8 = LayerPrecision(8, 8)
FP32 = LayerPrecision(None, None)


def space(**overrides) -> SearchSpace:
    data = {"version": 1, "weight_bits": [2, 4, 8], "act_bits": [4, 8], "layers": "all",
            "pinned": {"first": {"weight_bits": 8, "act_bits": 8}, "last": {"weight_bits": 8, "act_bits": 8}}}
    data.update(overrides)
    return SearchSpace.from_dict(data)


# -- the shipped spaces -----------------------------------------------------------------------------
def test_shipped_spaces_load_and_bind():
    assert available_spaces() == ["default", "deit_tiny", "int8_or_float", "resnet18"]
    r18 = BoundSpace(SearchSpace.load("resnet18"), R18, model="resnet18")
    assert len(R18) == 21 and R18[7] == "layer2.0.downsample.0"
    assert r18.n_var == 38 and len(r18.free_layers) == 19
    assert "layer2.0.downsample.0" in r18.free_layers  # searched like the other convs
    assert r18.pinned == {"conv1": W8A8, "fc": W8A8}
    assert r18.genes[0].name == "w:layer1.0.conv1" and r18.genes[1].name == "a:layer1.0.conv1"
    assert r18.genes[0].choices == (2, 3, 4, 5, 6, 8) and r18.genes[1].choices == (4, 5, 6, 8)
    assert r18.xl.tolist() == [0] * 38 and r18.xu.tolist() == [5, 3] * 19
    assert r18.size == (6 * 4) ** 19

    vit = BoundSpace(SearchSpace.load("deit_tiny"), vit_layers(), model="deit_tiny")
    assert vit.pinned == {"patch_embed.proj": W8A8, "head": W8A8}
    assert vit.n_var == 96 and vit.free_layers[0] == "blocks.0.attn.qkv"

    default = BoundSpace(SearchSpace.load("default"), ["a", "b", "c"])
    assert default.free_layers == ("b",) and default.n_var == 2

    # The latency space: every layer integer or float (null is the last, widest choice).
    latency = BoundSpace(SearchSpace.load("int8_or_float"), ["a", "b"])
    assert latency.genes[0].choices == (4, 8, None) and latency.genes[1].choices == (8, None) and latency.n_var == 4
    assert latency.decode(latency.xu) == {"a": LayerPrecision(None, None), "b": LayerPrecision(None, None)}
    # by path as well as by name
    assert SearchSpace.load(str(SPACES_DIR / "resnet18.yaml")) == SearchSpace.load("resnet18")


def test_default_space_for():
    assert default_space_for("resnet18") == "resnet18"
    assert default_space_for("deit_tiny") == "deit_tiny"
    assert default_space_for("deit_tiny_patch16_224") == "deit_tiny"
    assert default_space_for("vit_tiny_patch16_224") == "deit_tiny"
    assert default_space_for("resnet50") == "default"
    assert default_space_for("test_resnet") == "default"


def test_dict_round_trip():
    s = SearchSpace.from_dict({
        "version": 1, "description": "d", "weight_bits": [8, 2, 4], "act_bits": [None, 4],
        "layers": ["conv1", "re:layer1\\..*"],
        "pinned": {"conv1": {"weight_bits": 8, "act_bits": None, "granularity": "per-tensor"}},
        "groups": ["re:layer1\\.0\\..*", ["layer1.1.conv1", "layer1.1.conv2"]],
    })
    assert s.weight_bits == (2, 4, 8) and s.act_bits == (4, None)  # sorted, null = float32 last
    assert s.groups == (("re:layer1\\.0\\..*",), ("layer1.1.conv1", "layer1.1.conv2"))
    assert SearchSpace.from_dict(s.to_dict()) == s
    assert SearchSpace.from_yaml(s.to_yaml()) == s
    for name in available_spaces():
        shipped = SearchSpace.load(name)
        assert SearchSpace.from_dict(yaml.safe_load(shipped.to_yaml())) == shipped


# -- encoding -----------------------------------------------------------------------------------------
def test_decode_encode_round_trip_and_pins():
    b = BoundSpace(SearchSpace.load("resnet18"), R18)
    rng = np.random.default_rng(0)
    for _ in range(20):
        x = rng.integers(b.xl, b.xu + 1)
        layers = b.decode(x)
        assert list(layers) == R18  # every layer, in execution order
        assert layers["conv1"] == W8A8 and layers["fc"] == W8A8
        assert np.array_equal(b.encode(layers), x)
    x = np.array([0, 3] + [5, 0] * 18)
    layers = b.decode(x)
    assert layers["layer1.0.conv1"] == LayerPrecision(2, 8)
    assert layers["layer1.0.conv2"] == LayerPrecision(8, 4)
    # an unlisted layer means float32: not representable here, nor are foreign layers or bits
    assert b.encode({k: v for k, v in layers.items() if k != "layer1.0.conv1"}) is None
    assert b.encode({**layers, "layer1.0.conv1": LayerPrecision(7, 8)}) is None
    assert b.encode({**layers, "conv1": LayerPrecision(4, 8)}) is None  # a pin changed
    assert b.encode({**layers, "nope": W8A8}) is None
    assert b.encode({**layers, "layer1.0.conv1": LayerPrecision(2, 8, granularity="per-tensor")}) is None


def test_decode_rejects_bad_vectors():
    b = BoundSpace(space(), ["a", "b", "c"])
    assert b.n_var == 2
    for bad in ([0], [0, 0, 0], [3, 0], [-1, 0], [0.5, 0]):
        with pytest.raises(ValueError):
            b.decode(bad)
    assert b.decode(np.array([2.0, 1.0]))["b"] == LayerPrecision(8, 8)  # integral floats are fine


def test_unselected_layers_stay_float_and_uniform():
    s = space(layers=["re:layer1\\..*"], pinned={"first": {"weight_bits": 8, "act_bits": 8}})
    b = BoundSpace(s, R18)
    assert b.free_layers == tuple(n for n in R18 if n.startswith("layer1."))
    x = b.uniform(4, 8)
    layers = b.decode(x)
    assert layers["conv1"] == W8A8 and layers["fc"] == FP32 and layers["layer2.0.conv1"] == FP32
    assert all(layers[n] == LayerPrecision(4, 8) for n in b.free_layers)
    assert b.uniform(3, 8) is None and b.uniform(4, 6) is None  # not choices


def test_uniform_matches_the_shorthand_policy():
    b = BoundSpace(SearchSpace.load("resnet18"), R18)
    policy = uniform_policy("w4a4", model="resnet18", dataset="fashion-mnist", layers=R18)
    assert np.array_equal(b.encode(policy.layers), b.uniform(4, 4))


def test_groups_share_bits():
    s = space(groups=["re:layer1\\..*", ["layer2.0.conv1", "layer2.0.downsample.0"]])
    b = BoundSpace(s, R18)
    names = [g.name for g in b.genes]
    assert names[:2] == ["w:group0", "a:group0"] and "w:group1" in names
    assert b.genes[0].layers == ("layer1.0.conv1", "layer1.0.conv2", "layer1.1.conv1", "layer1.1.conv2")
    assert "w:layer1.0.conv1" not in names and "w:layer2.0.downsample.0" not in names
    assert b.n_var == 2 * (19 - 4 + 1 - 2 + 1)  # 19 free layers in 2 groups + 13 single layers
    x = np.arange(b.n_var) % (b.xu + 1)
    layers = b.decode(x)
    assert len({layers[n] for n in b.genes[0].layers}) == 1
    assert layers["layer2.0.conv1"] == layers["layer2.0.downsample.0"]
    assert np.array_equal(b.encode(layers), x)
    split = {**layers, "layer1.0.conv1": LayerPrecision(2, 4), "layer1.0.conv2": LayerPrecision(8, 4)}
    assert b.encode(split) is None  # a group's members must agree


def test_single_choice_operand_is_a_constant():
    b = BoundSpace(space(act_bits=[None]), ["a", "b", "c", "d"])  # a weight-only search
    assert [g.name for g in b.genes] == ["w:b", "w:c"]
    assert b.decode([0, 2]) == {"a": W8A8, "b": LayerPrecision(2, None), "c": LayerPrecision(8, None), "d": W8A8}
    assert b.uniform(4, None).tolist() == [1, 1]


def test_params_and_distributions():
    b = BoundSpace(SearchSpace.load("resnet18"), R18)
    x = np.random.default_rng(1).integers(b.xl, b.xu + 1)
    params = b.params(x)
    assert list(params) == [g.name for g in b.genes] and all(type(v) is int for v in params.values())
    assert np.array_equal(b.x_from_params(params), x)
    with pytest.raises(ValueError, match=r"missing \['w:layer1.0.conv1'\]"):
        b.x_from_params({k: v for k, v in params.items() if k != "w:layer1.0.conv1"})
    with pytest.raises(ValueError, match=r"unknown \['w:fc'\]"):
        b.x_from_params({**params, "w:fc": 0})
    with pytest.raises(ValueError, match="outside"):
        b.x_from_params({**params, "w:layer1.0.conv1": 6})
    dists = b.distributions()
    assert list(dists) == list(params)
    assert (dists["w:layer1.0.conv1"].low, dists["w:layer1.0.conv1"].high) == (0, 5)
    assert (dists["a:layer1.0.conv1"].low, dists["a:layer1.0.conv1"].high) == (0, 3)


# -- errors: one line naming the field ------------------------------------------------------------------
BAD = [
    ({"pinned": {"layer9": {"weight_bits": 8, "act_bits": 8}}},
     r"space\.pinned\.layer9: no such layer; `mpsearch layers --model resnet18` lists them"),
    ({"weight_bits": []}, r"space\.weight_bits: empty"),
    ({"act_bits": [4, 9]}, r"space\.act_bits\[1\]: bits must be an integer from 2 to 8 or null \(float32\), got 9"),
    ({"weight_bits": 4}, r"space\.weight_bits: expected a list of bit widths like \[2, 4, 8\], got 4"),
    ({"layers": ["re:layer9\\..*"]}, r"space\.layers\[0\]: pattern 're:layer9\\\\\.\.\*' matches no layer"),
    ({"groups": ["re:nothing.*"]}, r"space\.groups\[0\]: pattern 're:nothing\.\*' matches no layer"),
    ({"bits": [4]}, r"space\.bits: unknown field; allowed fields are"),
    ({"version": 2}, r"space\.version: this mpsearch reads version 1, got 2"),
    ({"groups": ["re:conv1|layer1\\.0\\.conv1"]},
     r"space\.groups\[0\]: layer 'conv1' is pinned \(space\.pinned\.first\) and grouped"),
    ({"groups": ["re:layer1\\..*", "layer1.0.conv1"]},
     r"space\.groups\[1\]: layer 'layer1\.0\.conv1' is already in space\.groups\[0\]"),
    ({"layers": ["re:layer1\\..*"], "groups": ["layer2.0.conv1"]},
     r"space\.groups\[0\]: layer 'layer2\.0\.conv1' is not searched"),
    ({"pinned": {"first": {"weight_bits": 8}}}, r"space\.pinned\.first\.act_bits: required"),
    ({"pinned": {"last": {"weight_bits": 1, "act_bits": 8}}}, r"space\.pinned\.last\.weight_bits: bits must be"),
    ({"layers": "conv1"}, r"space\.layers: use `all` or a list"),
    ({"layers": ["re:layer1[.*"]}, r"space\.layers\[0\]: invalid regular expression"),
    ({"weight_bits": [4, 4]}, r"space\.weight_bits: lists a bit width twice"),
    ({"weight_bits": [8], "act_bits": [8]}, r"space: nothing to search"),
    ({"layers": ["conv1", "fc"]}, r"space: every searched layer is pinned"),
    ({"pinned": {"first": {"weight_bits": 8, "act_bits": 8}, "conv1": {"weight_bits": 4, "act_bits": 8}}},
     r"space\.pinned\.conv1: layer 'conv1' is also pinned by space\.pinned\.first"),
    ({"layers": ["layer1.0.conv"]}, r"space\.layers\[0\]: no such layer 'layer1\.0\.conv' \(similar: layer1\.0\.conv[12], "),
]


@pytest.mark.parametrize(("change", "message"), BAD, ids=[f"{i}-{m.split(':')[0]}" for i, (_, m) in enumerate(BAD)])
def test_bad_spaces_give_one_line_errors(change, message):
    data = space().to_dict() | change
    with pytest.raises(UserError, match=message) as info:
        BoundSpace(SearchSpace.from_dict(data), R18, model="resnet18")
    assert "\n" not in str(info.value)


def test_bad_files(tmp_path):
    with pytest.raises(UserError, match=r"unknown search space 'resnet19'; choose one of default, deit_tiny, int8_or_float, resnet18"):
        SearchSpace.load("resnet19")
    with pytest.raises(UserError, match=r"cannot read it"):
        SearchSpace.load(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nweight_bits: [2, 4\n")
    with pytest.raises(UserError, match=r"bad\.yaml: space: not valid YAML \(.* at line \d+"):
        SearchSpace.load(str(bad))
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(UserError, match=r"bad\.yaml: space: expected a mapping"):
        SearchSpace.load(str(bad))
    bad.write_text("version: 1\nweight_bits: [2, 4]\nact_bits: [8]\npinned: {layer9: {weight_bits: 8, act_bits: 8}}\n")
    loaded = SearchSpace.load(str(bad))
    with pytest.raises(UserError, match=r"bad\.yaml: space\.pinned\.layer9: no such layer; `mpsearch layers --model MODEL`"):
        BoundSpace(loaded, R18)
