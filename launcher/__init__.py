"""FTL, the fine-tuning launcher: job spec, planner, CLI and the per-rank training entry."""
