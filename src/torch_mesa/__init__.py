"""torch-mesa: train Transformers with less memory.

Exact forward; what each layer keeps for backward is stored in 8, 4 or 2 bits
and expanded only when the gradient is computed. One call converts a model::

    import torch_mesa
    report = torch_mesa.compress_(model)              # 8 bits, in place
    print(report)
    print(torch_mesa.measure(model, batch))            # bytes kept for backward
    print(torch_mesa.verify(model, batch))             # exact vs converted, per parameter
"""

from .config import MesaConfig
from .compiled import compile, plan
from .checkpoint import from_pretrained, load_config, reapply_, save_conversion
from .convert import ConversionReport, compress_, config_of, is_compressed, restore_
from .measure import MemoryReport, measure
from .verify import VerifyReport, verify

__version__ = "0.1.0"

__all__ = [
    "ConversionReport",
    "MemoryReport",
    "MesaConfig",
    "compile",
    "compress_",
    "config_of",
    "from_pretrained",
    "load_config",
    "reapply_",
    "save_conversion",
    "is_compressed",
    "measure",
    "plan",
    "restore_",
    "verify",
    "VerifyReport",
    "__version__",
]
