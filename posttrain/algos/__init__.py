"""Losses and advantage estimators: small pure functions on tensors."""
