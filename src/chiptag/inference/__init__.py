"""Inference: the Predictor, `chiptag predict` (submission CSV) and export (ONNX, TorchScript)."""
