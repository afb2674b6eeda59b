"""Model I/O and graph plumbing: load, normalise, infer shapes, save."""
from onnxprune.ir.model_io import load_model, save_model
from onnxprune.ir.shapes import infer_shapes, static_shape

__all__ = ["load_model", "save_model", "infer_shapes", "static_shape"]
