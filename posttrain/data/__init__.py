"""Data: sources -> conversations -> token ids with loss masks -> padded or packed micro-batches."""
