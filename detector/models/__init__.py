"""Models: the Family seam, one module per family, the builders and our weights file."""

from detector.models.build import build_model, load_model

__all__ = ["build_model", "load_model"]
