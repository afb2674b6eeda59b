"""Op-type vocabularies that no single analysis rule owns: families of ops the
pruner does not handle yet, named in refusals with what the user can do."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class OpFamily:
    name: str
    op_types: frozenset[str]
    advice: str  # what to do about it, for the refusal message


# QDQ (QuantizeLinear/DequantizeLinear), dynamic quantization (DynamicQuantizeLinear, MatMulInteger,
# ConvInteger, DynamicQuantizeLSTM), MatMulNBits and the QOperator ops quantize_static writes for CNNs and
# MLPs prune (analysis/rules/quantized.py, qoperator.py, recurrent.py); these do not yet (onnxruntime's offline
# fusions MatMulIntegerToFloat and DynamicQuantizeMatMul also have no shape inference)
QUANTIZED = OpFamily(
    "quantized operator ops",
    frozenset({"QLinearSoftmax", "QLinearWhere", "QLinearReduceMean", "MatMulIntegerToFloat", "DynamicQuantizeMatMul",
               "QAttention", "QOrderedMatMul"}),
    "they have no pruning rule yet: prune the float model, then quantize it "
    "(QDQ or QOperator format, or dynamic quantization: those prune as they are)",
)
SPECTRAL = OpFamily(
    "spectrogram front end",
    frozenset({"STFT", "DFT", "MelWeightMatrix"}),
    "its frequency bins are a fixed transform, not learned channels",
)

UNSUPPORTED_FAMILIES = (QUANTIZED, SPECTRAL)
