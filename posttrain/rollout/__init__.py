"""Generation backends and rollout loops."""
