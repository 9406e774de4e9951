"""Policy worker, model loading, optimizer/schedule, log-probs, checkpoints and export."""
