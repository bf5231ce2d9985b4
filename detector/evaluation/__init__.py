"""Evaluation: COCO results and COCOeval (boxes and masks), the error analysis; never runs a model."""
