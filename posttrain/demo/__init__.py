"""The tiny local model and tokenizer, and `posttrain demo`."""
