"""Cost models: per-layer MAC/parameter counts and size, BOPs and energy of bit assignments.

Independent of the quantization code: bit widths are plain integers (``None`` = float32).
"""

from __future__ import annotations

from mpsearch.cost.counting import CostTable, LayerCost, count_costs
from mpsearch.cost.energy import (
    FLOAT_BITS,
    Bits,
    EnergyProfile,
    EnergyReport,
    Formula,
    LayerEnergy,
    bops,
    energy,
    energy_savings,
    fp32_energy,
    list_formulas,
    list_profiles,
    load_profile,
    register_formula,
    relative_savings,
    size_bytes,
)

__all__ = [
    "FLOAT_BITS",
    "Bits",
    "CostTable",
    "EnergyProfile",
    "EnergyReport",
    "Formula",
    "LayerCost",
    "LayerEnergy",
    "bops",
    "count_costs",
    "energy",
    "energy_savings",
    "fp32_energy",
    "list_formulas",
    "list_profiles",
    "load_profile",
    "register_formula",
    "relative_savings",
    "size_bytes",
]
