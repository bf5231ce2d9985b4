"""Inference: the Predictor, sliced inference, folders of images and videos."""
