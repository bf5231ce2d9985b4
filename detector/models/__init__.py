"""Models: the Family seam, one module per family, the builders and our weights file."""
