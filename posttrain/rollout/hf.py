"""Generation with Hugging Face `generate` (KV cache, batched, left-padded prompts)."""

from __future__ import annotations

import torch


@torch.no_grad()
def generate_text(model, tokenizer, conversations: list[list[dict[str, str]]], *, max_new_tokens: int,
                  batch_size: int = 64, temperature: float = 0.0) -> list[str]:
    """Completions of chat prompts; temperature 0 is greedy decoding."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generated tokens must follow each prompt directly
    outputs: list[str] = []
    try:
        for start in range(0, len(conversations), batch_size):
            prompts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
                       for c in conversations[start : start + batch_size]]
            enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
            out = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id, use_cache=True, **sampling)
            outputs += tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return outputs
