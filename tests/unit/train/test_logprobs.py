import torch

from posttrain.train.logprobs import token_logprobs


def test_chunked_logprobs_equal_full_log_softmax():
    torch.manual_seed(0)
    logits = torch.randn(3, 7, 50, dtype=torch.float64)
    targets = torch.randint(0, 50, (3, 7))
    expected = logits.log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1)
    got = token_logprobs(logits, targets, chunk_size=4)  # chunks straddle rows
    torch.testing.assert_close(got, expected.float(), rtol=0, atol=1e-6)


def test_logprobs_are_float32_for_bfloat16_logits():
    logits = torch.randn(2, 3, 10).to(torch.bfloat16)
    assert token_logprobs(logits, torch.zeros(2, 3, dtype=torch.long)).dtype == torch.float32
