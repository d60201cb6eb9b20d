"""Cost models: per-layer MAC/parameter counts and size, BOPs and energy of bit assignments.

Independent of the quantization code: bit widths are plain integers (``None`` = float32).

Importing this package registers every built-in variant: the energy formulas (defined in
:mod:`mpsearch.cost.energy`, looked up by :mod:`mpsearch.cost.energy_profiles`) and the hardware
energy meters (:mod:`mpsearch.cost.rapl`, :mod:`mpsearch.cost.nvml`, registered in
:mod:`mpsearch.cost.meters`).
"""

from __future__ import annotations

from mpsearch.cost import nvml, rapl  # noqa: F401  (import registers the hardware meters)
from mpsearch.cost.counting import CostTable, LayerCost, count_costs
from mpsearch.cost.energy import (
    FLOAT_BITS,
    Bits,
    EnergyReport,
    bops,
    energy,
    energy_savings,
    fp32_energy,
    relative_savings,
    size_bytes,
)
from mpsearch.cost.energy_profiles import (
    EnergyProfile,
    Formula,
    LayerEnergy,
    list_formulas,
    list_profiles,
    load_profile,
    register_formula,
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
