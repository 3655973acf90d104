"""data_pipeline."""
