"""Deployment: export with parity checks, int8 quantization, runtimes and the exported-model predictor."""
