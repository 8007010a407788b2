"""Zero-shot evaluation with lm-evaluation-harness, one Parquet row per document."""
