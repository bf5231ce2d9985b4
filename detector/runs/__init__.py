"""What a run leaves behind: metrics files and W&B, plots, lineage, run comparison."""
