"""Evaluation of kfm checkpoints: validation loss and bits per byte (benchmarks come later)."""
