"""Evaluation: sample-based metrics (pure functions) and benchmark loaders."""
