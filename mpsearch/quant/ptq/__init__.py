"""Post-training weight quantization methods: how a layer's weights are put on their grid.

Every method takes the grid an observer chose (per-channel scale and zero point) and returns the
layer's fake-quantized weight; what differs is which grid point each weight gets. Round-to-nearest
minimises the weight error; GPTQ and AdaRound minimise the error of the layer's *output* on
calibration inputs, which is what accuracy depends on; BRECQ that of a whole residual or
transformer block. Methods register by name and share one
contract (tests/test_ptq.py); the quantizer caches their results per (layer, bits), so a search
pays for each (layer, bits) once.
"""

from mpsearch.quant.ptq.adaround import AdaRound
from mpsearch.quant.ptq.base import PTQ_METHODS, WeightRounding, get_ptq, input_columns, register_ptq, rtn_weight
from mpsearch.quant.ptq.brecq import BRECQ
from mpsearch.quant.ptq.gptq import GPTQ
from mpsearch.quant.ptq.rtn import RoundToNearest

__all__ = ["PTQ_METHODS", "WeightRounding", "get_ptq", "register_ptq", "input_columns", "rtn_weight",
           "RoundToNearest", "GPTQ", "AdaRound", "BRECQ"]
