"""The Hugging Face generation backend: sampling controls, finish reasons, log-probs, weight updates."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import AutoModelForCausalLM

from posttrain.config import PolicyConfig, TokenizerConfig
from posttrain.data.conversations import tokenize_prompt
from posttrain.data.trajectories import Trajectory, collate_trajectories
from posttrain.rollout.base import SamplingParams
from posttrain.rollout.hf import HFGenerationBackend, SampledTokenLogprobs
from posttrain.train.logprobs import response_logprobs


@pytest.fixture(scope="module")
def backend(tiny_model_dir):
    cfg = PolicyConfig(model_name=str(tiny_model_dir), device="cpu")
    cfg.generation.batch_size = 5  # several generate() calls per request
    return HFGenerationBackend(cfg)


@pytest.fixture(scope="module")
def prompts(backend):
    questions = [f"What is {a} + {b}?" for a, b in [(1, 2), (13, 4), (99, 98), (5, 0), (42, 17), (7, 7), (3, 60)]]
    return [tokenize_prompt(backend.tokenizer, [{"role": "user", "content": q}]) for q in questions]


def test_greedy_matches_plain_generate_and_reports_length_finish(backend, prompts, tiny_model_dir):
    out = backend.generate(prompts, SamplingParams(max_new_tokens=6, temperature=0.0))
    assert len(out) == len(prompts)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    for prompt, completion in zip(prompts, out, strict=True):
        expected = model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False,
                                  eos_token_id=backend.tokenizer.eos_token_id,
                                  pad_token_id=backend.tokenizer.pad_token_id)[0, len(prompt):].tolist()
        eos = backend.tokenizer.eos_token_id
        expected = expected[: expected.index(eos) + 1] if eos in expected else expected
        assert completion.token_ids == expected  # left padding in a batch changes nothing
        assert completion.finish_reason == ("stop" if expected[-1] == eos else "length")
        assert len(completion.logprobs) == len(completion.token_ids)


def test_repeated_prompts_share_one_prefill_and_give_the_same_completions(backend, prompts):
    """GRPO's G copies of a prompt are prefilled once (a cache copied to each row): the greedy
    tokens and log-probs are those of generating every row on its own."""
    repeated = [p for p in prompts[:3] for _ in range(3)] + [prompts[4]]  # uneven groups, one batch
    saved = backend.batch_size
    backend.batch_size = len(repeated)
    try:
        pad = backend.tokenizer.pad_token_id
        width = max(len(p) for p in repeated)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in repeated])
        mask = (torch.arange(width) >= torch.tensor([width - len(p) for p in repeated])[:, None]).long()
        assert backend._shared_prompt_cache(repeated, ids, mask) is not None  # the shared path is taken
        shared = backend.generate(repeated, SamplingParams(max_new_tokens=6, temperature=0.0))
    finally:
        backend.batch_size = saved
    alone = {tuple(p): backend.generate([p], SamplingParams(max_new_tokens=6, temperature=0.0))[0] for p in prompts}
    for prompt, completion in zip(repeated, shared, strict=True):
        expected = alone[tuple(prompt)]
        assert completion.token_ids == expected.token_ids
        assert completion.logprobs == pytest.approx(expected.logprobs, abs=1e-4)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_generator_logprobs_match_the_trainer_forward(backend, prompts, temperature):
    torch.manual_seed(0)
    grouped = [p for p in prompts for _ in range(3)]  # as GRPO groups arrive: the trainer packs them
    out = backend.generate(grouped, SamplingParams(max_new_tokens=10, temperature=temperature, top_p=0.9))
    trajectories = [Trajectory(p, c.token_ids, c.logprobs, 0.0) for p, c in zip(grouped, out, strict=True)]
    batch = collate_trajectories(trajectories, backend.tokenizer.pad_token_id)
    assert batch["input_ids"].shape[0] == len(prompts)
    with torch.no_grad():
        trainer = response_logprobs(backend.model, batch, temperature)[0]
    mask = batch["loss_mask"].bool()
    generator = batch["generator_logprobs"]
    assert mask.sum() > 50
    assert (trainer - generator)[mask].abs().max().item() < 1e-3


def test_step_by_step_logprobs_equal_those_of_the_stored_logits(backend, prompts):
    """The hooks keep one step's distribution at a time, yet give what `output_logits` (every step's
    [B, V] logits kept to the end) gives, including rows that stop early and are padded after."""
    width = max(len(p) for p in prompts)
    pad = backend.tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = (ids != pad).long()
    torch.manual_seed(1)
    with SampledTokenLogprobs(backend.model, 0.8) as sampled, torch.no_grad():
        result = backend.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=True,
                                        temperature=0.8, top_p=None, top_k=0, pad_token_id=pad,
                                        eos_token_id=backend.tokenizer.eos_token_id,
                                        output_logits=True, return_dict_in_generate=True)
    new_tokens = result.sequences[:, width:]
    assert (new_tokens[:, :-1] == backend.tokenizer.eos_token_id).any()  # a row stopped early (then padded)
    expected = (torch.stack(result.logits, 1).float() / 0.8).log_softmax(-1).gather(-1, new_tokens[..., None])
    torch.testing.assert_close(sampled.of(new_tokens), expected.squeeze(-1), rtol=1e-5, atol=1e-5)
    assert len(backend.model._forward_hooks) == len(backend.model._forward_pre_hooks) == 0  # removed on exit


def test_top_k_one_is_greedy(backend, prompts):
    greedy = backend.generate(prompts, SamplingParams(max_new_tokens=5, temperature=0.0))
    top1 = backend.generate(prompts, SamplingParams(max_new_tokens=5, temperature=1.0, top_k=1))
    assert [c.token_ids for c in greedy] == [c.token_ids for c in top1]


def test_stop_strings_end_the_response(backend, prompts):
    free = backend.generate(prompts[:3], SamplingParams(max_new_tokens=8, temperature=0.0))
    # stop on the text of each response's first two tokens: generation must end right there, even
    # though the prompt's last characters plus the first token may already form that text
    for prompt, completion in zip(prompts[:3], free, strict=True):
        if len(completion.token_ids) < 3:
            continue
        stop = backend.tokenizer.decode(completion.token_ids[:2])
        [stopped] = backend.generate([prompt], SamplingParams(max_new_tokens=8, temperature=0.0, stop_strings=[stop]))
        assert stopped.finish_reason == "stop"
        assert stop in stopped.text and len(stopped.token_ids) == 2


def test_padding_after_a_stop_string_is_not_taken_for_eos(tiny_model_dir, prompts):
    """A tokenizer without a pad token pads with EOS (see load_tokenizer): a row that a stop string
    ended while others went on is followed by EOS padding, which is no token the model sampled."""
    backend = HFGenerationBackend(PolicyConfig(model_name=str(tiny_model_dir), device="cpu"))
    backend.tokenizer.pad_token = backend.tokenizer.eos_token
    params = SamplingParams(max_new_tokens=12, temperature=1.0, seed=0)
    free = backend.generate(prompts, params)
    stop = backend.tokenizer.decode(free[0].token_ids[:2])
    stopped = backend.generate(prompts, dataclasses.replace(params, stop_strings=[stop]))
    assert stopped[0].finish_reason == "stop" and stopped[0].token_ids == free[0].token_ids[:2]
    assert any(len(c.token_ids) > 2 for c in stopped)  # other rows went on: the first one was padded
    for f, s in zip(free, stopped, strict=True):  # the same draws, cut where the stop string appeared
        assert s.token_ids == f.token_ids[: len(s.token_ids)]
        assert len(s.logprobs) == len(s.token_ids)


def test_the_checkpoints_generation_defaults_do_not_change_the_sampled_distribution(tiny_model_dir, prompts):
    """Sampling settings come from SamplingParams only; a checkpoint's generation_config.json extras
    (a repetition penalty, say) would make rollouts come from another distribution than the policy's."""
    model_dir = tiny_model_dir.parent / "with_generation_defaults"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.generation_config.repetition_penalty = 100.0
    model.generation_config.no_repeat_ngram_size = 1
    model.save_pretrained(model_dir)
    plain = HFGenerationBackend(PolicyConfig(model_name=str(tiny_model_dir), device="cpu"))
    tuned = HFGenerationBackend(PolicyConfig(model_name=str(model_dir), device="cpu",
                                             tokenizer=TokenizerConfig(name=str(tiny_model_dir))))
    params = SamplingParams(max_new_tokens=6, temperature=0.0)
    assert [c.token_ids for c in tuned.generate(prompts, params)] == [c.token_ids for c in plain.generate(prompts, params)]


def test_update_weights_changes_what_is_generated(tiny_model_dir, prompts):
    cfg = PolicyConfig(model_name=str(tiny_model_dir), device="cpu")
    backend = HFGenerationBackend(cfg)
    other = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    params = SamplingParams(max_new_tokens=6, temperature=0.0)
    before = backend.generate(prompts, params)
    backend.update_weights(other.state_dict())
    after = backend.generate(prompts, params)
    reference = HFGenerationBackend(cfg)
    reference.model = other.eval()
    assert [c.token_ids for c in after] == [c.token_ids for c in reference.generate(prompts, params)]
    assert [c.token_ids for c in after] != [c.token_ids for c in before]


def test_seeded_sampling_is_a_function_of_seed_and_rank(backend, prompts):
    def sample(b, seed):
        out = b.generate(prompts[:5], SamplingParams(max_new_tokens=4, temperature=1.0, seed=seed))
        return [c.token_ids for c in out]

    first = sample(backend, 7)
    torch.rand(100)  # whatever else used the RNG in between does not matter
    assert sample(backend, 7) == first
    assert sample(backend, 8) != first
    other_rank = HFGenerationBackend(backend.cfg, rank=1, world_size=2)  # data-parallel copies draw differently
    assert sample(other_rank, 7) != first


@pytest.mark.parametrize("source", ["config", "checkpoint"])
def test_extra_stop_tokens_end_a_response(tiny_model_dir, prompts, tmp_path, source):
    """An end-of-turn token the tokenizer does not call EOS (a base model's chat template, Llama-3's
    <|eot_id|>) ends a response when policy.generation.stop_token_ids or the checkpoint's
    generation_config names it; the token is kept, as EOS is."""
    params = SamplingParams(max_new_tokens=8, temperature=0.0)
    free = HFGenerationBackend(PolicyConfig(model_name=str(tiny_model_dir), device="cpu")).generate(prompts[:1], params)
    assert free[0].finish_reason == "length"  # no EOS in the 8 tokens: the token picked below is not EOS
    token = free[0].token_ids[2]
    cfg = PolicyConfig(model_name=str(tiny_model_dir), device="cpu")
    if source == "config":
        cfg.generation.stop_token_ids = [token]
    else:
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        model.generation_config.eos_token_id = [model.generation_config.eos_token_id, token]
        model.save_pretrained(tmp_path / "model")
        cfg.model_name, cfg.tokenizer = str(tmp_path / "model"), TokenizerConfig(name=str(tiny_model_dir))
    [stopped] = HFGenerationBackend(cfg).generate(prompts[:1], params)
    first = free[0].token_ids.index(token)
    assert stopped.token_ids == free[0].token_ids[: first + 1] and stopped.finish_reason == "stop"


def test_load_weights_takes_the_trainers_stream_and_refuses_gaps_and_strangers(tiny_model_dir, prompts):
    from posttrain.train.policy import Policy

    cfg = PolicyConfig(model_name=str(tiny_model_dir), device="cpu")
    policy = Policy(cfg, total_steps=1)
    with torch.no_grad():
        for p in policy.model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    backend = HFGenerationBackend(cfg)
    backend.load_weights(policy.generator_tensors())
    for name, tensor in policy.model.state_dict().items():
        torch.testing.assert_close(backend.model.state_dict()[name], tensor, rtol=0, atol=0)
    streamed = list(policy.generator_tensors())
    with pytest.raises(ValueError, match=r"left 1 tensor\(s\) of the generation model unset"):
        backend.load_weights([(name, t) for name, t in streamed if name != "model.norm.weight"])
    with pytest.raises(KeyError, match="'model.extra.weight', which the generation model does not have"):
        backend.load_weights([*streamed, ("model.extra.weight", torch.zeros(1))])
