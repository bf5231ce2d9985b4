"""Inference: the Predictor, sliced inference, folders of images and videos."""

from detector.inference.predictor import Predictor
from detector.inference.slicing import SliceSpec

__all__ = ["Predictor", "SliceSpec"]
