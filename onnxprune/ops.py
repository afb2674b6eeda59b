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
# ConvInteger) and MatMulNBits prune (analysis/rules/quantized.py); these do not yet (onnxruntime's
# offline fusions MatMulIntegerToFloat and DynamicQuantizeMatMul also have no shape inference)
QUANTIZED = OpFamily(
    "quantized operator ops",
    frozenset({"QLinearConv", "QLinearMatMul", "QLinearAdd", "QLinearMul", "QLinearSigmoid", "QLinearLeakyRelu",
               "QLinearGlobalAveragePool", "QLinearAveragePool", "QLinearConcat", "QLinearSoftmax", "QGemm",
               "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "QAttention", "QOrderedMatMul"}),
    "their integer weights are not prunable yet: prune the float model, then quantize it "
    "(QDQ format, or dynamic quantization: those prune as they are)",
)
RECURRENT = OpFamily(  # LSTM, GRU and RNN prune (analysis/rules/recurrent.py); int8 ones do not
    "quantized recurrent ops",
    frozenset({"DynamicQuantizeLSTM"}),
    "their int8 weights are not prunable: prune the float model (LSTM hidden units are), then quantize it; "
    "the layers around them still prune",
)
SPECTRAL = OpFamily(
    "spectrogram front end",
    frozenset({"STFT", "DFT", "MelWeightMatrix"}),
    "its frequency bins are a fixed transform, not learned channels",
)

UNSUPPORTED_FAMILIES = (QUANTIZED, RECURRENT, SPECTRAL)
