"""Side-by-side benchmarks against Hugging Face TRL; run from the repository root as `python -m bench.<name>`."""
