import pytest
import torch

from posttrain.config import PolicyConfig
from posttrain.train.logprobs import is_right_padding, picked_logprobs, sequence_logprobs, token_logprobs
from posttrain.train.model import load_model


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


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir):
    return load_model(PolicyConfig(model_name=str(tiny_model_dir)), torch.device("cpu"))


def _full_logprobs(model, batch):
    """Reference: logits at every position, log_softmax over the whole vocabulary."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    return logits.log_softmax(-1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)


def test_sequence_logprobs_score_only_target_positions_and_match_the_full_forward(tiny_model):
    torch.manual_seed(0)
    input_ids = torch.randint(3, 400, (2, 9))
    attention_mask = torch.ones(2, 9, dtype=torch.long)
    attention_mask[1, 7:] = 0
    loss_mask = torch.zeros(2, 9)
    loss_mask[0, 5:] = 1  # tokens 5..8 of row 0, 3..6 of row 1: columns 2..7 of the shifted [2, 8] layout
    loss_mask[1, 3:7] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}
    head_inputs = []
    hook = tiny_model.get_output_embeddings().register_forward_hook(lambda m, args, out: head_inputs.append(args[0]))
    with torch.no_grad():
        logprobs, mask = sequence_logprobs(tiny_model, batch)
        hook.remove()
        expected = _full_logprobs(tiny_model, batch)
    assert head_inputs[0].shape[0] == 8  # the LM head ran on the 4 + 4 predicting positions only
    assert logprobs.shape == mask.shape == (2, 6)  # the 6 columns where some row has a target
    torch.testing.assert_close(mask, loss_mask[:, 1:][:, 2:])
    torch.testing.assert_close(logprobs, expected[:, 2:] * mask, rtol=1e-5, atol=1e-5)  # 0 where no target


def _logprobs_and_forward_kwargs(model, batch):
    calls = []
    hook = model.register_forward_pre_hook(lambda module, args, kwargs: calls.append(kwargs), with_kwargs=True)
    try:
        with torch.no_grad():
            logprobs, mask = sequence_logprobs(model, batch)
    finally:
        hook.remove()
    return logprobs, mask, calls[0]


def test_right_padding_needs_no_attention_mask_and_gives_the_same_logprobs(tiny_model):
    torch.manual_seed(1)
    input_ids = torch.randint(3, 400, (3, 10))
    attention_mask = torch.ones(3, 10, dtype=torch.long)
    attention_mask[0, 6:] = 0
    attention_mask[2, 8:] = 0
    input_ids[attention_mask == 0] = 0
    loss_mask = attention_mask.float()
    loss_mask[:, :3] = 0
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}
    logprobs, mask, kwargs = _logprobs_and_forward_kwargs(tiny_model, batch)
    assert "attention_mask" not in kwargs  # causal attention cannot see trailing pads
    with torch.no_grad():
        expected = _full_logprobs(tiny_model, batch)[:, 2:]
    torch.testing.assert_close(logprobs, expected * mask, rtol=1e-5, atol=1e-5)


def test_a_mask_with_leading_pads_is_kept(tiny_model):
    torch.manual_seed(2)
    input_ids = torch.randint(3, 400, (2, 8))
    attention_mask = torch.ones(2, 8, dtype=torch.long)
    attention_mask[1, :3] = 0  # left padding: without the mask, row 1 would attend to its pads
    loss_mask = torch.zeros(2, 8)
    loss_mask[:, 5:] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}
    logprobs, mask, kwargs = _logprobs_and_forward_kwargs(tiny_model, batch)
    assert kwargs["attention_mask"] is attention_mask
    with torch.no_grad():
        expected = _full_logprobs(tiny_model, batch)[:, 4:]
    torch.testing.assert_close(logprobs, expected * mask, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("rows", "right_padding"), [
    ([[1, 1, 1], [1, 1, 1]], True),
    ([[1, 1, 0], [1, 0, 0]], True),
    ([[1, 1, 1], [0, 0, 0]], True),
    ([[0, 1, 1], [1, 1, 1]], False),
    ([[1, 0, 1], [1, 1, 1]], False),
])
def test_is_right_padding(rows, right_padding):
    assert is_right_padding(torch.tensor(rows)) is right_padding
    assert is_right_padding(torch.tensor(rows, dtype=torch.bool)) is right_padding


def test_is_right_padding_is_false_without_a_2d_mask():
    assert not is_right_padding(None)
    assert not is_right_padding(torch.ones(2, 1, 3, 3, dtype=torch.bool))  # a custom 4-D mask stays


def test_sequence_logprobs_without_logits_to_keep(tiny_model):
    """A model whose forward has no `logits_to_keep` returns every position; the columns are picked after."""

    class NoLogitsToKeep(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask=None, use_cache=False):
            return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=use_cache)

    input_ids = torch.randint(3, 400, (1, 6))
    batch = {"input_ids": input_ids, "attention_mask": torch.ones(1, 6, dtype=torch.long),
             "loss_mask": torch.tensor([[0.0, 0, 0, 1, 1, 0]])}
    with torch.no_grad():
        plain, _ = sequence_logprobs(NoLogitsToKeep(tiny_model), batch)
        kept, _ = sequence_logprobs(tiny_model, batch)
        expected = _full_logprobs(tiny_model, batch)
    torch.testing.assert_close(plain, kept)
    torch.testing.assert_close(plain, expected[:, 2:4], rtol=1e-5, atol=1e-5)


def test_sequence_logprobs_of_a_model_without_a_separate_lm_head(tiny_model):
    """Without an output-embedding module to hook, the positions are picked from the logits."""

    class NoHeadModule(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, **kwargs):
            return self.model(**kwargs)

    batch = {"input_ids": torch.randint(3, 400, (2, 7)), "attention_mask": torch.ones(2, 7, dtype=torch.long),
             "loss_mask": torch.tensor([[0.0, 0, 0, 1, 1, 0, 0], [0, 0, 0, 0, 1, 1, 1]])}
    with torch.no_grad():
        plain, _ = sequence_logprobs(NoHeadModule(tiny_model), batch)
        hooked, mask = sequence_logprobs(tiny_model, batch)
        expected = _full_logprobs(tiny_model, batch)
    torch.testing.assert_close(plain, hooked)
    torch.testing.assert_close(plain, expected[:, 2:6] * mask, rtol=1e-5, atol=1e-5)


def test_the_lm_head_hook_is_removed_after_the_forward_pass(tiny_model):
    batch = {"input_ids": torch.randint(3, 400, (1, 5)), "attention_mask": torch.ones(1, 5, dtype=torch.long),
             "loss_mask": torch.tensor([[0.0, 0, 1, 1, 0]])}
    with torch.no_grad():
        sequence_logprobs(tiny_model, batch)
        assert tiny_model(input_ids=batch["input_ids"]).logits.shape == (1, 5, tiny_model.config.vocab_size)


def test_a_batch_without_targets_gives_a_zero_loss_that_backpropagates(tiny_model):
    batch = {"input_ids": torch.randint(3, 400, (2, 5)), "attention_mask": torch.ones(2, 5, dtype=torch.long),
             "loss_mask": torch.zeros(2, 5)}
    logprobs, mask = sequence_logprobs(tiny_model, batch)
    loss = -(logprobs * mask).sum()
    loss.backward()
    assert logprobs.shape == (2, 0) and loss.item() == 0.0


def test_a_model_that_reshapes_the_head_output_is_named(tiny_model):
    class Reshaping(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def get_output_embeddings(self):
            return self.model.get_output_embeddings()

        def forward(self, **kwargs):
            out = self.model(**kwargs)
            out.logits = out.logits[None]
            return out

    batch = {"input_ids": torch.randint(3, 400, (1, 5)), "attention_mask": torch.ones(1, 5, dtype=torch.long),
             "loss_mask": torch.tensor([[0.0, 0, 1, 1, 0]])}
    with pytest.raises(RuntimeError, match="Reshaping reshapes the LM head's output"):
        sequence_logprobs(Reshaping(tiny_model), batch)


def test_picked_logprobs_equal_log_softmax_at_the_source_rows():
    torch.manual_seed(0)
    flat = torch.randn(5, 50, dtype=torch.float64)
    source = torch.tensor([[0, 0, 3], [4, 1, 2]])  # row 0 predicts two targets, as a shared prompt's last position
    targets = torch.randint(0, 50, (2, 3))
    expected = flat.log_softmax(-1)[source, targets]
    torch.testing.assert_close(picked_logprobs(flat, source, targets, chunk_size=2), expected.float())
