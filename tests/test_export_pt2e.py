"""PT2E export: the .pt2 program, compiled by torch.compile, computes what the fake-quantized model
computes, on oneDNN int8 kernels."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

import mpsearch
from mpsearch.cli import main
from mpsearch.policy import LayerPrecision

pytest.importorskip("torchao", reason="the PT2E flow needs torchao (pip install 'mpsearch[pt2e]')")

from mpsearch.export.pt2e import INT8_KERNELS, Pt2eClassifier, compiled_int8_ops, read_pt2e_metadata  # noqa: E402


def _test_images(digits, n: int = 256) -> torch.Tensor:
    return torch.cat([x for x, _ in digits.test.subset(n).batches(128)])


def test_the_compiled_program_computes_the_fake_quantized_model_on_int8_kernels(digits_baseline, digits, tmp_path):
    from mpsearch.api import _quantized

    model = digits_baseline.model
    policy = _quantized(model, "w4a4", digits, None).policy
    off = list(policy.layers)[1]  # one layer left fp32: it must stay a float convolution
    policy = replace(policy, layers={**policy.layers, off: LayerPrecision(weight_bits=None, act_bits=None)})
    path = mpsearch.export_pt2e(model, tmp_path / "w4a4.pt2", digits, policy=policy)
    assert read_pt2e_metadata(path)["policy"]["layers"] == policy.to_dict()["layers"]

    x = _test_images(digits)
    with torch.no_grad():
        fake = mpsearch.quantize(model, policy, digits)(x)
    logits = Pt2eClassifier(path, threads=1).logits(x)
    # 4-bit inputs stay on their 16 levels only through the clamp before each layer: without
    # it, inductor's uint8 kernels use all 256 levels and a few percent of predictions move.
    assert float((logits.argmax(1) == fake.argmax(1)).float().mean()) >= 0.99
    assert float(np.median((logits - fake).abs().max(dim=1).values.numpy())) < 1e-4 * float(fake.abs().max())

    # int8 weights and nothing else: convert_pt2e's left-over float weights are not in the file.
    fp32 = mpsearch.export_pt2e(model, tmp_path / "fp32.pt2", digits, policy="fp32")
    assert path.stat().st_size < 0.5 * fp32.stat().st_size

    ops = compiled_int8_ops(path, x[:4])
    quantized_layers = sum(1 for p in policy.layers.values() if p.weight_bits and p.act_bits)
    assert sum(ops.get(op, 0) for op in INT8_KERNELS) == quantized_layers


def test_export_and_evaluate_pt2e_on_the_command_line(digits_baseline, digits, tmp_path, capsys):
    checkpoint = digits_baseline.checkpoint  # the cached baseline's state dict, named as a user would
    out = tmp_path / "m.pt2"
    assert main(["export", "--model", "test_resnet", "--dataset", "digits", "--checkpoint", str(checkpoint),
                 "--policy", "w4a8", "-o", str(out), "--no-progress"]) == 0
    assert "PT2E program for torch.compile" in capsys.readouterr().out
    assert main(["evaluate", "--pt2e", str(out), "--split", "test", "--limit", "128", "--checkpoint", str(checkpoint),
                 "--threads", "1", "--json", "--no-progress"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["runtime"] == "torch.compile" and result["images"] == 128 and result["policy"] == "W4-8 A8"
    assert result["agreement"] >= 0.99 and result["exported_accuracy"] > 0.5
