"""Deployment: export with parity checks, int8 quantization, runtimes and the exported-model predictor."""

from detector.deploy.exported import ExportedPredictor
from detector.deploy.runtimes import exported_predictor

__all__ = ["ExportedPredictor", "exported_predictor"]
