"""edgefleet compression: the reference models, quantized ONNX / TFLite variants, measurements and the accuracy gate.

Importing the package needs neither torch nor a converter; those load inside the functions that use them.
"""

from compression.data import Dataset, load_dataset
from compression.errors import CompressionError, ConversionError, ConverterUnavailableError, InvalidInputError
from compression.evaluate import CompressionReport, GateVerdict, LatencyBudget, Measurement, gate
from compression.variants import VARIANT_SPECS, BuiltVariant, VariantSpec

__all__ = [
    "VARIANT_SPECS",
    "BuiltVariant",
    "CompressionError",
    "CompressionReport",
    "ConversionError",
    "ConverterUnavailableError",
    "Dataset",
    "GateVerdict",
    "InvalidInputError",
    "LatencyBudget",
    "Measurement",
    "VariantSpec",
    "gate",
    "load_dataset",
]
