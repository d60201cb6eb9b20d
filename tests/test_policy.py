from __future__ import annotations

import json

import pytest

from mpsearch.errors import UserError
from mpsearch.policy import LayerPrecision, Policy, parse_shorthand, uniform_policy

LAYERS = ["conv1", "layer1.0.conv1", "layer1.0.conv2", "fc"]
SHA = "ab" * 32


def _policy() -> Policy:
    return Policy(
        model="resnet18",
        dataset="fashion-mnist",
        checkpoint_sha256=SHA,
        layers={
            "conv1": LayerPrecision(8, 8),
            "layer1.0.conv1": LayerPrecision(3, 5, granularity="per-tensor", symmetric=False, act_symmetric=True),
            "fc": LayerPrecision(None, 6),
        },
        provenance={"study": "s", "trial": 7, "seed": 0, "metrics": {"accuracy": 0.9}},
    )


def test_json_round_trip(tmp_path):
    p = _policy()
    path = tmp_path / "p.json"
    p.save(path)
    loaded = Policy.load(path)
    assert loaded == p
    assert json.loads(path.read_text())["layers"]["fc"]["weight_bits"] is None
    assert loaded.precision("layer1.0.conv2") == LayerPrecision(None, None)  # unlisted: fp32
    assert loaded.bits() == {"conv1": (8, 8), "layer1.0.conv1": (3, 5), "fc": (None, 6)}


def test_shorthands():
    assert parse_shorthand("w8a8") == (8, 8, True)
    assert parse_shorthand("W4A8") == (4, 8, True)
    assert parse_shorthand("w8") == (8, None, True)
    assert parse_shorthand("fp32") == (None, None, True)
    assert parse_shorthand("w2a4:all") == (2, 4, False)
    p = uniform_policy("w4a4", model="m", dataset="d", layers=LAYERS)
    assert p.bits() == {"conv1": (8, 8), "layer1.0.conv1": (4, 4), "layer1.0.conv2": (4, 4), "fc": (8, 8)}
    p_all = uniform_policy("w4a4:all", model="m", dataset="d", layers=LAYERS)
    assert set(p_all.bits().values()) == {(4, 4)}
    assert uniform_policy("fp32", model="m", dataset="d", layers=LAYERS).layers == {}
    assert uniform_policy("w8", model="m", dataset="d", layers=LAYERS).bits()["fc"] == (8, None)


@pytest.mark.parametrize("bad", ["w9a9", "w1a8", "int4", "w4a", ""])
def test_bad_shorthands(bad):
    with pytest.raises(UserError):
        parse_shorthand(bad)


def _doc(**changes):
    d = _policy().to_dict()
    for key, value in changes.items():
        d[key] = value
    return d


@pytest.mark.parametrize(
    "mutate, field",
    [
        (lambda d: d["layers"]["conv1"].update(weight_bits=9), "policy.layers.conv1.weight_bits"),
        (lambda d: d["layers"]["conv1"].update(act_bits=1), "policy.layers.conv1.act_bits"),
        (lambda d: d["layers"]["conv1"].update(weight_bits=True), "policy.layers.conv1.weight_bits"),
        (lambda d: d["layers"]["conv1"].update(weight_bits="8"), "policy.layers.conv1.weight_bits"),
        (lambda d: d["layers"]["conv1"].update(granularity="per-row"), "policy.layers.conv1.granularity"),
        (lambda d: d["layers"]["conv1"].update(symmetric="yes"), "policy.layers.conv1.symmetric"),
        (lambda d: d["layers"]["conv1"].update(wbits=8), "policy.layers.conv1"),
        (lambda d: d["layers"]["conv1"].pop("act_bits"), "policy.layers.conv1.act_bits"),
        (lambda d: d["layers"].update(fc=8), "policy.layers.fc"),
        (lambda d: d.update(version=2), "policy.version"),
        (lambda d: d.update(model=""), "policy.model"),
        (lambda d: d.update(layers=[]), "policy.layers"),
        (lambda d: d.update(checkpoint_sha256="xyz"), "policy.checkpoint_sha256"),
        (lambda d: d.update(extra=1), "policy.extra"),
        (lambda d: d.update(format="other"), "policy.format"),
    ],
)
def test_bad_policies_name_the_field(mutate, field):
    d = _policy().to_dict()
    mutate(d)
    with pytest.raises(UserError) as err:
        Policy.from_dict(d)
    assert str(err.value).startswith(field)
    assert "\n" not in str(err.value)


def test_malformed_json_and_missing_file(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        Policy.load(path)
    with pytest.raises(UserError, match="cannot read"):
        Policy.load(tmp_path / "missing.json")


def test_validation_against_a_model():
    p = _policy()
    p.validate_for(model="resnet18", layers=LAYERS, checkpoint_sha256=SHA)
    with pytest.raises(UserError, match=r"^policy.model: this policy is for model 'resnet18', not 'deit_tiny'"):
        p.validate_for(model="deit_tiny", layers=LAYERS)
    with pytest.raises(UserError, match=r"^policy.layers.fc: model 'resnet18' has no quantizable layer"):
        p.validate_for(model="resnet18", layers=LAYERS[:-1])
    with pytest.raises(UserError, match=r"^policy.checkpoint_sha256"):
        p.validate_for(model="resnet18", layers=LAYERS, checkpoint_sha256="cd" * 32)
