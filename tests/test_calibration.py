"""Kernel tables and calibrated profiles: the fit recovers known coefficients from synthetic
tables, the fitted profile reproduces the fit when the search uses it, agreement statistics are
right, and ``mpsearch profile`` / ``calibrate-energy`` work end to end on a tiny model."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from mpsearch.cli import main
from mpsearch.cost import count_costs, energy, load_profile
from mpsearch.cost.calibration import agreement, calibrate_energy, fit_profile, policy_agreement, profile_toml
from mpsearch.cost.energy import kernel_bytes
from mpsearch.cost.energy_profiles import parse_profile_text
from mpsearch.cost.kernel_table import KernelRow, KernelTable, layer_inputs, load_kernel_table, profile_layers
from mpsearch.errors import UserError


@pytest.fixture(autouse=True)
def _profiles_dir(tmp_path, monkeypatch):
    """Fitted profiles installed by these tests land in a throwaway folder, not the user's cache."""
    monkeypatch.setenv("MPSEARCH_PROFILES", str(tmp_path / "installed-profiles"))


TRUE = {"mac": {"fp32": 2e-4, "bf16": 1.2e-4, "int8": 5e-5}, "call": {"fp32": 3.0, "bf16": 4.0, "int8": 6.0}, "per_byte": 1e-3}


def _layers(n: int = 8, seed: int = 0) -> list[tuple[str, int, int, int, int, int]]:
    """(name, macs, weight_params, bias_params, input_elems, output_elems) of made-up layers."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        cin, cout, hw = int(rng.choice([8, 16, 32, 64])), int(rng.choice([8, 16, 32, 64])), int(rng.choice([4, 8, 16]))
        out.append((f"l{i}", cin * cout * 9 * hw * hw, cin * cout * 9, cout, cin * hw * hw, cout * hw * hw))
    return out


def _table(noise: float = 0.0, seed: int = 0, energy_j: bool = False, layers=None) -> KernelTable:
    rng = np.random.default_rng(seed + 1)
    rows = []
    for name, macs, w, b, i, o in layers or _layers():
        for p in ("fp32", "bf16", "int8"):
            row = KernelRow(name, "conv", p, macs, w, b, i, o, 0.0, None, None, 10, 1.0)
            us = TRUE["mac"][p] * macs + TRUE["call"][p] + TRUE["per_byte"] * row.memory_bytes
            us *= 1 + noise * rng.standard_normal()
            rows.append(replace(row, seconds=us * 1e-6, energy_j=us * 1e-6 * 30 if energy_j else None))
    return KernelTable(model="made-up", dataset="none", device="cpu", device_name="test CPU", machine="test machine",
                       torch=torch.__version__, threads=1, batch_size=8, window_s=1.0, time_meter="wallclock",
                       energy_meter="rapl" if energy_j else None, energy_unavailable=None if energy_j else "no meter",
                       skipped={}, rows=tuple(rows), created="2026-11-27T00:00:00+00:00")


def test_fit_recovers_known_coefficients_from_an_exact_table():
    fit = fit_profile(_table(), "latency")
    for p in ("fp32", "bf16", "int8"):
        assert fit.mac[p] == pytest.approx(TRUE["mac"][p], rel=1e-6)
        assert fit.call[p] == pytest.approx(TRUE["call"][p], rel=1e-5)
    assert fit.per_byte == pytest.approx(TRUE["per_byte"], rel=1e-5)
    assert fit.r2 == pytest.approx(1.0, abs=1e-9)
    assert fit.r2_leave_one_layer_out == pytest.approx(1.0, abs=1e-6)
    assert fit.per_layer.spearman == pytest.approx(1.0)
    assert fit.units == "us"


def test_fit_on_noisy_table_is_close_but_not_perfect():
    fit = fit_profile(_table(noise=0.1, layers=_layers(24)), "latency")
    assert 0.8 < fit.r2 < 1.0
    assert fit.r2_leave_one_layer_out < fit.r2  # predicting unseen layers is harder
    assert fit.mac["fp32"] == pytest.approx(TRUE["mac"]["fp32"], rel=0.25)
    assert fit.mac["int8"] < fit.mac["fp32"]


def test_fit_is_non_negative_even_when_least_squares_would_go_negative():
    layers = _layers(10)
    t = _table(layers=layers)
    # make int8 calls look free and int8 MACs slightly negative in the data: NNLS clips at 0
    rows = tuple(replace(r, seconds=max(r.seconds - 6e-6 - 0.2 * 5e-11 * r.macs, 1e-9)) if r.precision == "int8" else r for r in t.rows)
    fit = fit_profile(replace(t, rows=rows), "latency")
    assert min(fit.coefficients()) >= 0


def test_energy_target_uses_the_energy_column_and_needs_it():
    fit = fit_profile(_table(energy_j=True), "energy")
    assert fit.units == "uJ"
    assert fit.mac["fp32"] == pytest.approx(TRUE["mac"]["fp32"] * 30, rel=1e-6)
    with pytest.raises(UserError, match="no energy column"):
        fit_profile(_table(), "energy")
    with pytest.raises(UserError, match="target 'power': choose one of"):
        fit_profile(_table(), "power")


def test_too_small_a_table_is_refused():
    with pytest.raises(UserError, match="more rows than coefficients"):
        fit_profile(_table(layers=_layers(2)), "latency")


def test_fitted_profile_reproduces_the_fit_through_the_energy_model():
    """What the search sees (energy() over a bit assignment) equals the fitted row costs."""
    table = _table()
    fit = fit_profile(table, "latency")
    profile = parse_profile_text(profile_toml(fit, table, name="made-up-cpu", table_path="t.json"), "test")
    assert profile.formula == "kernel-fit" and profile.units == "us"
    rows = {(r.layer, r.precision): r for r in table.rows}
    from mpsearch.cost.counting import CostTable

    cost = CostTable(tuple(rows[n, "fp32"].layer_cost() for n, *_ in _layers()), 0, (1, 1, 1))
    measured_fp32 = sum(r.seconds for r in table.rows if r.precision == "fp32") * 1e6
    measured_int8 = sum(r.seconds for r in table.rows if r.precision == "int8") * 1e6
    assert energy(cost, {}, profile).total == pytest.approx(measured_fp32, rel=1e-5)
    w8a8 = {n: (8, 8) for n in cost.names}
    assert energy(cost, w8a8, profile).total == pytest.approx(measured_int8, rel=1e-5)
    # narrower widths run on the same int8 kernel: same cost; a 16-bit layer runs in float
    assert energy(cost, {n: (4, 4) for n in cost.names}, profile).total == pytest.approx(measured_int8, rel=1e-5)
    assert energy(cost, {"l0": (16, 8)}, profile).layer("l0").total == pytest.approx(rows["l0", "fp32"].seconds * 1e6, rel=1e-5)
    # a float kernel of bf16 prices float layers at the bf16 rows
    bf = parse_profile_text(profile_toml(fit, table, name="x", table_path="t.json", float_kernel="bf16"), "test")
    assert energy(cost, {}, bf).total == pytest.approx(sum(r.seconds for r in table.rows if r.precision == "bf16") * 1e6, rel=1e-5)


def test_kernel_bytes_by_precision():
    row = KernelRow("l", "conv", "int8", 100, 10, 2, 20, 30, 1e-6, None, None, 1, 1.0)
    assert kernel_bytes(row.layer_cost(), "int8") == 10 + 20 + 30 + 2 * 4  # float biases in int8 kernels
    assert kernel_bytes(row.layer_cost(), "fp32") == (10 + 20 + 30 + 2) * 4
    assert kernel_bytes(row.layer_cost(), "bf16") == (10 + 20 + 30 + 2) * 2
    assert row.memory_bytes == 68


def test_agreement_statistics():
    table = _table(noise=0.05)
    horowitz = load_profile("horowitz45nm")
    a = agreement(table, horowitz, "latency")
    assert a is not None and a.n == 16 and a.median_abs_rel_error is None  # fp32 + int8 rows; other units
    assert -1 <= a.kendall <= 1 and -1 <= a.spearman <= 1
    fit = fit_profile(table, "latency")
    fitted = parse_profile_text(profile_toml(fit, table, name="f", table_path="t"), "test")
    by_profile, measured, modeled = policy_agreement(table, [fitted, horowitz], n_policies=50, seed=3)
    assert len(measured) == 50
    assert measured[0] == pytest.approx(sum(r.seconds for r in table.rows if r.precision == "fp32") * 1e6)
    assert measured[1] == pytest.approx(sum(r.seconds for r in table.rows if r.precision == "int8") * 1e6)
    assert by_profile["f"].spearman > 0.95  # fitted to these rows
    assert by_profile["f"].median_abs_rel_error < 0.05
    again = policy_agreement(table, [fitted], n_policies=50, seed=3)[1]
    np.testing.assert_array_equal(again, measured)  # seeded


def test_kernel_table_round_trip_and_bad_files(tmp_path):
    table = _table()
    path = tmp_path / "t.json"
    table.save(path)
    assert load_kernel_table(path) == table
    data = json.loads(path.read_text())
    bad = {
        "missing": None,
        "version": {**data, "version": 9},
        "field": {**data, "extra": 1},
        "precision": {**data, "rows": [{**data["rows"][0], "precision": "int3"}]},
        "negative": {**data, "rows": [{**data["rows"][0], "seconds": -1.0}]},
        "row_fields": {**data, "rows": [{"layer": "x"}]},
    }
    messages = {"missing": "does not exist", "version": "version 1", "field": "unknown field", "precision": "unknown precision",
                "negative": "seconds", "row_fields": "exactly the fields"}
    for key, content in bad.items():
        p = tmp_path / f"{key}.json"
        if content is not None:
            p.write_text(json.dumps(content))
        with pytest.raises(UserError, match=messages[key]):
            load_kernel_table(p)
    (tmp_path / "text.json").write_text("not json")
    with pytest.raises(UserError, match="not JSON"):
        load_kernel_table(tmp_path / "text.json")


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.fc = nn.Linear(8 * 6 * 6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.grouped(self.conv(x)).relu().flatten(1))


def test_profile_layers_measures_every_layer_at_each_runnable_precision():
    torch.manual_seed(0)
    model = _Net()
    cost = count_costs(model, (1, 6, 6))
    shapes = layer_inputs(model, (1, 6, 6), cost.names)
    assert shapes["conv"][1] == (1, 6, 6) and shapes["fc"][1] == (288,)
    table = profile_layers(model, cost, model_name="net", dataset="none", precisions=["fp32", "int8", "fp16"],
                           batch_size=4, window_s=0.01, energy_meter="auto", progress=False)
    assert {(r.layer, r.precision) for r in table.rows} == {(n, p) for n in cost.names for p in ("fp32", "int8")}
    assert "fp16" in table.skipped  # no fp16 kernel on the CPU: skipped with a reason, not emulated
    assert all(r.seconds > 0 and r.calls >= 1 and r.window_s >= 0.01 for r in table.rows)
    assert table.row("conv", "int8").macs == cost.layer("conv").macs
    assert table.energy_meter is None or table.rows[0].energy_j is not None
    assert (table.energy_unavailable is None) == (table.energy_meter is not None)


def test_int8_kernel_computes_the_layer():
    """The int8 kernel that is timed is the real quantized layer: its output matches fp32."""
    from mpsearch.cost.kernels import KERNELS

    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1).eval()
    x = torch.rand(2, 4, 5, 5) * 4
    out = KERNELS.get("int8")().build(conv, x)().dequantize()
    ref = conv(x)
    # the output is requantized to a fixed uint8 grid (scale 0.05, zero point 128): within range it matches
    inside = ref.abs() < 6
    assert torch.allclose(out[inside], ref[inside], atol=0.1)


def test_profile_and_calibrate_energy_cli(tmp_path, capsys):
    out = tmp_path / "prof"
    argv = ["profile", "--model", "test_resnet", "--dataset", "digits", "--window", "0.01", "--batch-size", "4",
            "--precisions", "fp32,int8", "--out-dir", str(out), "--no-progress"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "fp32/int8" in printed and "total" in printed
    table = load_kernel_table(out / "table.json")
    assert table.precisions == ["fp32", "int8"] and len(table.layers) >= 10
    assert (out / "table.csv").read_text().count("\n") == len(table.rows) + 1
    assert main(["calibrate-energy", "--table", str(out / "table.json"), "--policies", "20", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["target"] == "latency" and result["r2"] <= 1
    assert {r["profile"] for r in result["agreement"]} == {"test_resnet-cpu-latency", "horowitz45nm", "seed-lab4"}
    profile = load_profile(result["profile"])  # the written profile loads by path like a built-in one
    assert profile.formula == "kernel-fit"
    for path in (result["report"], *result["plots"]):
        assert Path(path).stat().st_size > 0
    assert "R2" in Path(result["report"]).read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_profile_on_cuda_without_a_gpu_is_one_line(capsys):
    assert main(["profile", "--model", "test_resnet", "--dataset", "digits", "--device", "cuda"]) == 2
    assert "--device cuda: torch sees no CUDA GPU here" in capsys.readouterr().err


@pytest.mark.skipif(Path("/sys/class/powercap").exists(), reason="needs a machine without RAPL")
def test_asking_for_an_energy_meter_that_cannot_measure_is_one_line(capsys, tmp_path):
    argv = ["profile", "--model", "test_resnet", "--dataset", "digits", "--energy-meter", "rapl", "--out-dir", str(tmp_path)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--energy-meter rapl" in err and "powercap" in err and len(err.strip().splitlines()) == 1


def test_calibrate_energy_writes_next_to_the_table(tmp_path):
    table = _table(noise=0.02)
    table.save(tmp_path / "table.json")
    result = calibrate_energy(str(tmp_path / "table.json"), n_policies=10, name="mine")
    assert result.profile_path == str(tmp_path / "mine.toml")
    assert load_profile(result.profile_path).name == "mine"
    with pytest.raises(UserError, match=".toml"):
        calibrate_energy(str(tmp_path / "table.json"), out=str(tmp_path / "p.txt"))
    with pytest.raises(UserError, match="float_kernel fp16: the table has no fp16 rows"):
        calibrate_energy(str(tmp_path / "table.json"), float_kernel="fp16")
