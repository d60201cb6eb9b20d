"""Cost counting and energy models checked against numbers computed by hand."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import pytest
import timm
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from mpsearch.cost import (
    CostTable,
    LayerCost,
    bops,
    count_costs,
    energy,
    energy_savings,
    fp32_energy,
    list_profiles,
    load_profile,
    register_formula,
    size_bytes,
)
from mpsearch.errors import UserError


def conv_net() -> nn.Module:
    return nn.Sequential(
        OrderedDict(
            c0=nn.Conv2d(1, 4, 3, padding=1),
            bn=nn.BatchNorm2d(4),
            act=nn.ReLU(),
            dw=nn.Conv2d(4, 4, 3, padding=1, groups=4),
            down=nn.Conv2d(4, 8, 3, stride=2, padding=1),
            flat=nn.Flatten(),
            fc=nn.Linear(8 * 4 * 4, 10),
        )
    )


@pytest.fixture(scope="module")
def conv_table() -> CostTable:
    return count_costs(conv_net(), (1, 8, 8))


@pytest.fixture(scope="module")
def vit_table() -> CostTable:
    torch.manual_seed(0)
    vit = VisionTransformer(
        img_size=8, patch_size=4, embed_dim=16, depth=1, num_heads=2, num_classes=10, in_chans=1
    )
    return count_costs(vit, (1, 8, 8))


def test_conv_net_counts(conv_table: CostTable) -> None:
    assert conv_table.names == ("c0", "dw", "down", "fc")
    # c0: out 4*8*8 = 256 elems * (1 in-ch * 3*3) = 2304; weight 4*1*3*3 = 36
    assert conv_table.layer("c0") == LayerCost("c0", "conv", 2304, 36, 4, 64, 256)
    # depthwise: out 256 * (4/4 * 9) = 2304; weight 4*1*9 = 36
    assert conv_table.layer("dw") == LayerCost("dw", "conv", 2304, 36, 4, 256, 256)
    # stride 2: out 8*4*4 = 128 * (4 * 9) = 4608; weight 8*4*9 = 288
    assert conv_table.layer("down") == LayerCost("down", "conv", 4608, 288, 8, 256, 128)
    # flattened linear: 10 outputs * 128 in = 1280
    assert conv_table.layer("fc") == LayerCost("fc", "linear", 1280, 1280, 10, 128, 10)
    assert conv_table.total_macs == 2304 + 2304 + 4608 + 1280
    assert conv_table.other_params == 8  # BatchNorm weight + bias (running stats are buffers)
    assert conv_table.input_shape == (1, 8, 8)


class SeqNet(nn.Module):
    """Image (1, C, H, W) -> tokens (1, H*W, C) -> shared Linear applied twice."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.pos = nn.Parameter(torch.zeros(1, 12, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.flatten(2).transpose(1, 2) + self.pos
        return self.lin(self.lin(tokens))


def test_sequence_linear_counts_tokens_and_repeated_calls_sum() -> None:
    table = count_costs(SeqNet(), (2, 3, 4))
    # N = 3*4 = 12 tokens: one call = 12 * 2 out * 2 in = 48 MACs; two calls = 96
    assert table.layer("lin") == LayerCost("lin", "linear", 96, 4, 2, 48, 48)
    assert table.other_params == 24  # pos: 12*2


def test_trace_restores_training_flags_and_removes_hooks() -> None:
    net = conv_net()
    net.train()
    net.bn.eval()
    count_costs(net, (1, 8, 8))
    assert net.training and not net.bn.training and net.c0.training
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in net.modules())


def test_bad_input_shape_is_user_error() -> None:
    with pytest.raises(UserError, match="channels, height, width"):
        count_costs(conv_net(), (8, 8))  # type: ignore[arg-type]


def test_vit_block_counts(vit_table: CostTable) -> None:
    t = vit_table
    assert t.names == (
        "patch_embed.proj",
        "blocks.0.attn.qkv",
        "blocks.0.attn.matmul_qk",
        "blocks.0.attn.matmul_av",
        "blocks.0.attn.proj",
        "blocks.0.mlp.fc1",
        "blocks.0.mlp.fc2",
        "head",
    )
    # patch embed: Conv2d(1, 16, 4, stride 4) -> 16*2*2 = 64 outputs * 1*4*4 = 1024
    assert t.layer("patch_embed.proj") == LayerCost("patch_embed.proj", "conv", 1024, 256, 16, 64, 64)
    # N = 4 patches + 1 cls = 5 tokens, C = 16
    # qkv: 5*48 outputs * 16 = 3840
    assert t.layer("blocks.0.attn.qkv") == LayerCost("blocks.0.attn.qkv", "linear", 3840, 768, 48, 80, 240)
    # q·kᵀ: heads 2 * N 5 * N 5 * head_dim 8 = 400; inputs q,k 2*5*16 = 160; scores 2*5*5 = 50
    assert t.layer("blocks.0.attn.matmul_qk") == LayerCost(
        "blocks.0.attn.matmul_qk", "matmul", 400, 0, 0, 160, 50, 80
    )
    # attn·v: 400; inputs attn 50 + v 80 = 130; output 5*16 = 80
    assert t.layer("blocks.0.attn.matmul_av") == LayerCost(
        "blocks.0.attn.matmul_av", "matmul", 400, 0, 0, 130, 80, 80
    )
    assert t.layer("blocks.0.attn.proj").macs == 1280  # 5*16*16
    assert t.layer("blocks.0.mlp.fc1").macs == 5120  # 5*64*16
    assert t.layer("blocks.0.mlp.fc2").macs == 5120  # 5*16*64
    assert t.layer("head").macs == 160  # cls token only: 10*16
    # cls 16 + pos_embed 5*16 = 80 + norm1, norm2, final norm 3 * (16 + 16) = 96
    assert t.other_params == 192


def test_timm_test_resnet_all_layers_traced() -> None:
    model = timm.create_model("test_resnet", num_classes=10, in_chans=1)
    table = count_costs(model, (1, 32, 32))
    expected = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert sorted(table.names) == sorted(expected)
    assert table.total_params == sum(p.numel() for p in model.parameters())
    assert all(layer.macs > 0 for layer in table)


# --- size and BOPs -----------------------------------------------------------------------------

MIXED = {"c0": (8, 8), "down": (4, 8)}


def test_size_bytes(conv_table: CostTable) -> None:
    # weights 36*1 + 36*4 + 288*0.5 + 1280*4 = 5444; biases (4+4+8+10)*4 = 104; BN 8*4 = 32
    assert size_bytes(conv_table, MIXED) == pytest.approx(5580)
    # fp32: (36+36+288+1280 + 26 + 8) * 4 = 1674 * 4
    assert size_bytes(conv_table, {}) == pytest.approx(6696)


def test_bops(conv_table: CostTable) -> None:
    # 2304*8*8 + 2304*32*32 + 4608*4*8 + 1280*32*32
    assert bops(conv_table, MIXED) == pytest.approx(147456 + 2359296 + 147456 + 1310720)


def test_bad_bits_are_user_errors(conv_table: CostTable) -> None:
    with pytest.raises(UserError, match="does not have: nope"):
        bops(conv_table, {"nope": (8, 8)})
    with pytest.raises(UserError, match="integer from 1 to 32"):
        size_bytes(conv_table, {"c0": (0, 8)})


# --- energy ------------------------------------------------------------------------------------

# Linear(4, 2) on a flat input: 8 MACs, weight 8, bias 2, input 4, output 2
TINY = CostTable((LayerCost("fc", "linear", 8, 8, 2, 4, 2),), other_params=0, input_shape=(4, 1, 1))


@pytest.mark.parametrize(
    ("bits", "arithmetic", "memory"),
    [
        ((8, 8), 8.0, 3200.0),  # 8 * 1;  200 * (10 params * 1 + 6 acts * 1)
        ((4, 8), 4.0, 2200.0),  # 8 * (4/8)(8/8);  200 * (10 * 0.5 + 6 * 1)
        ((None, None), 128.0, 12800.0),  # 8 * 4 * 4;  200 * 16 * 4
    ],
)
def test_seed_lab4_by_hand(bits: tuple[int | None, int | None], arithmetic: float, memory: float) -> None:
    report = energy(TINY, {"fc": bits}, "seed-lab4")
    assert report.layer("fc").arithmetic == pytest.approx(arithmetic)
    assert report.memory == pytest.approx(memory)
    assert report.total == pytest.approx(arithmetic + memory)
    assert report.units == "arbitrary units"


def test_horowitz_by_hand() -> None:
    # DRAM 1300 pJ / 64 bit = 20.3125 pJ/bit; SRAM 1 MB 100 / 64 = 1.5625 pJ/bit
    w8 = energy(TINY, {"fc": (8, 8)}, "horowitz45nm")
    assert w8.arithmetic == pytest.approx(8 * (0.2 + 0.1))  # int8 mult + int32 add
    # weights 8*8*20.3125 = 1300; bias 2*32*20.3125 = 1300; in 4*8*1.5625 = 50; out 2*8*1.5625 = 25
    assert w8.memory == pytest.approx(2675.0)
    w4 = energy(TINY, {"fc": (4, 8)}, "horowitz45nm")
    assert w4.arithmetic == pytest.approx(8 * (0.2 * 32 / 64 + 0.1))
    assert w4.memory == pytest.approx(650 + 1300 + 50 + 25)
    fp = fp32_energy(TINY, "horowitz45nm")
    assert fp.arithmetic == pytest.approx(8 * (3.7 + 0.9))
    assert fp.memory == pytest.approx(5200 + 1300 + 200 + 100)
    assert w8.savings_vs(fp) == pytest.approx(1 - 2677.4 / 6836.8)


def test_matmul_operands_charged_at_own_widths(vit_table: CostTable) -> None:
    # seed-lab4 q·kᵀ at (k 4 bits, q 8 bits): 400 * (4/8)(8/8) = 200;
    # memory 200 * (k 80 * 0.5 + (q 80 + scores 50) * 1) = 200 * 170
    e = energy(vit_table, {"blocks.0.attn.matmul_qk": (4, 8)}, "seed-lab4").layer("blocks.0.attn.matmul_qk")
    assert (e.arithmetic, e.memory) == pytest.approx((200.0, 34000.0))


@pytest.mark.parametrize("profile", ["seed-lab4", "horowitz45nm"])
def test_lower_bits_save_more(vit_table: CostTable, profile: str) -> None:
    def uniform(b: int) -> dict[str, tuple[int, int]]:
        return {name: (b, b) for name in vit_table.names}

    s8 = energy_savings(vit_table, uniform(8), profile)
    s4 = energy_savings(vit_table, uniform(4), profile)
    assert 0 < s8 < s4 < 1


def test_profiles_registry_and_errors(tmp_path: Path) -> None:
    assert {"seed-lab4", "horowitz45nm"} <= set(list_profiles())
    prof = load_profile("horowitz45nm")
    assert prof.units == "pJ" and prof.sources and "Horowitz" in prof.sources[0]
    with pytest.raises(UserError, match=r"known profiles: .*horowitz45nm"):
        load_profile("horowitz7nm")
    with pytest.raises(UserError, match="does not exist"):
        load_profile(tmp_path / "missing.toml")
    with pytest.raises(ValueError, match="already registered"):
        register_formula("seed-lab4")(lambda layer, wb, ab, profile: None)  # type: ignore[arg-type,return-value]


CUSTOM = """
name = "mine"
description = "seed-lab4 with free memory"
units = "au"
formula = "seed-lab4"
sources = ["made up for a test"]
[rules]
float_bits = 32
[mac]
reference_bits = 8
energy = 2.0
[memory]
reference_bits = 8
energy_per_element = {per_element}
"""


def test_custom_profile_path(tmp_path: Path) -> None:
    path = tmp_path / "mine.toml"
    path.write_text(CUSTOM.format(per_element="0.0"))
    report = energy(TINY, {"fc": (8, 8)}, str(path))
    assert (report.profile, report.arithmetic, report.memory) == ("mine", 16.0, 0.0)  # 8 MACs * 2
    path.write_text(CUSTOM.format(per_element='"lots"'))
    with pytest.raises(UserError, match=r"memory\.energy_per_element"):
        load_profile(path)
    path.write_text(CUSTOM.replace("[memory]", "[memo]").format(per_element="1.0"))
    with pytest.raises(UserError, match="lacks memory"):
        load_profile(path)
    path.write_text(CUSTOM.replace('formula = "seed-lab4"', 'formula = "nope"').format(per_element="1.0"))
    with pytest.raises(UserError, match="unknown formula 'nope'"):
        load_profile(path)
