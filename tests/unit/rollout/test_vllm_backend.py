"""The vLLM generation backend against the Hugging Face one and the trainer's forward pass.

Runs on vLLM's CPU build (`make install` adds it on Linux x86_64). The engine lives in a Ray actor,
as in GRPO: vLLM binds threads and replaces `torch.set_num_threads` in its own process.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import ray
import torch
from transformers import AutoModelForCausalLM

from posttrain.config import PolicyConfig
from posttrain.data.conversations import tokenize_prompt
from posttrain.data.trajectories import Trajectory, collate_trajectories
from posttrain.demo.tiny_model import save_tiny_model
from posttrain.rollout.base import SamplingParams
from posttrain.rollout.hf import HFGenerationBackend
from posttrain.train.logprobs import response_logprobs

pytest.importorskip("vllm")

GREEDY = SamplingParams(max_new_tokens=8, temperature=0.0)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    # vLLM's CPU attention kernels need a head size of at least 32: the demo model's, not the test model's 16.
    return save_tiny_model(tmp_path_factory.mktemp("vllm") / "model", size="demo")


@pytest.fixture(scope="module")
def hf(model_dir):
    return HFGenerationBackend(_cfg(model_dir, None))


@pytest.fixture(scope="module")
def prompts_text():
    return [f"What is {a} + {b}?" for a, b in [(1, 2), (13, 4), (99, 98), (5, 0), (42, 17), (7, 7)]]


@pytest.fixture(scope="module")
def prompts(hf, prompts_text):
    return [tokenize_prompt(hf.tokenizer, [{"role": "user", "content": q}]) for q in prompts_text]


@pytest.fixture(scope="module")
def stop_token(hf, prompts):
    """A token the first prompt's greedy response holds at position 3 (not EOS: the random model
    never samples it early), made a stop token of both backends, so that a response ends on it."""
    [free] = hf.generate(prompts[:1], GREEDY)
    assert free.finish_reason == "length"
    return free.token_ids[3]


def _cfg(model_dir, stop_token: int | None) -> PolicyConfig:
    cfg = PolicyConfig(model_name=str(model_dir), device="cpu", max_total_sequence_length=128)
    cfg.generation.backend = "vllm"
    cfg.generation.vllm.enforce_eager = True
    cfg.generation.vllm.kv_cache_memory_gb = 0.25
    cfg.generation.stop_token_ids = None if stop_token is None else [stop_token]
    return cfg


@pytest.fixture(scope="module")
def vllm_backend(model_dir, stop_token, ray_session):
    from posttrain.rollout.vllm import VLLMGenerationBackend

    actor = ray.remote(VLLMGenerationBackend).remote(_cfg(model_dir, stop_token))
    yield actor
    ray.kill(actor)


def _shared_buckets() -> set[Path]:
    """The shared-memory files weight buckets travel through to a tensor-parallel engine's shards."""
    return set(Path("/dev/shm").glob("posttrain-weights-*")) | set(Path(tempfile.gettempdir()).glob("posttrain-weights-*"))


def _generate(actor, prompts, params):
    return ray.get(actor.generate.remote(prompts, params))


def test_greedy_responses_stop_tokens_and_stop_strings_match_the_hf_backend(vllm_backend, model_dir, stop_token,
                                                                            prompts):
    hf = HFGenerationBackend(_cfg(model_dir, stop_token))
    ours, theirs = _generate(vllm_backend, prompts, GREEDY), hf.generate(prompts, GREEDY)
    assert [c.token_ids for c in ours] == [c.token_ids for c in theirs]
    assert [c.finish_reason for c in ours] == [c.finish_reason for c in theirs]
    assert [c.text for c in ours] == [c.text for c in theirs]
    assert ours[0].finish_reason == "stop" and ours[0].token_ids[-1] == stop_token  # kept, as EOS is
    assert any(c.finish_reason == "length" for c in ours)
    for completion, reference in zip(ours, theirs, strict=True):
        assert completion.logprobs == pytest.approx(reference.logprobs, abs=1e-4)

    # A stop string found in a response: both cut after the token that completes it.
    text = theirs[1].text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    with_stop = SamplingParams(max_new_tokens=8, temperature=0.0, stop_strings=[stop])
    ours, theirs = _generate(vllm_backend, prompts[1:2], with_stop), hf.generate(prompts[1:2], with_stop)
    assert ours[0].token_ids == theirs[0].token_ids and ours[0].finish_reason == theirs[0].finish_reason == "stop"
    assert len(ours[0].token_ids) < 8
    assert _generate(vllm_backend, [], GREEDY) == hf.generate([], GREEDY) == []


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampled_logprobs_equal_the_trainer_forward(vllm_backend, model_dir, hf, prompts, temperature):
    grouped = [p for p in prompts for _ in range(4)]
    out = _generate(vllm_backend, grouped, SamplingParams(max_new_tokens=12, temperature=temperature, seed=3))
    trajectories = [Trajectory(p, c.token_ids, c.logprobs, 0.0) for p, c in zip(grouped, out, strict=True)]
    batch = collate_trajectories(trajectories, hf.tokenizer.pad_token_id)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        trainer = response_logprobs(model, batch, temperature)[0]
    mask = batch["loss_mask"].bool()
    assert mask.sum() > 100
    assert (trainer - batch["generator_logprobs"])[mask].abs().max().item() < 1e-4
    assert len({tuple(c.token_ids) for c in out}) > len(prompts)  # a group's samples differ


def test_seeded_sampling_is_reproducible(vllm_backend, prompts):
    # More prompt tokens than one engine step takes (4096): the CPU build must not split a seeded prefill.
    many = prompts * 50
    assert sum(map(len, many)) > 4096

    def sample(seed):
        return [c.token_ids for c in _generate(vllm_backend, many, SamplingParams(4, 1.0, seed=seed))]

    first = sample(7)
    assert sample(7) == first
    assert sample(8) != first
    assert first[0] != first[len(prompts)]  # copies of a prompt get their own seeds


def test_update_weights_reaches_the_engine_and_clears_the_prefix_cache(vllm_backend, model_dir, stop_token, hf,
                                                                      prompts):
    """After loading other weights, the same prompts (whose KV the prefix cache held) give what the
    new weights give, in tokens and log-probs; loading the old ones back gives the old responses."""
    long = " ".join(str(i) for i in range(100))  # several KV blocks: cached whole
    prompts = [*prompts, tokenize_prompt(hf.tokenizer, [{"role": "user", "content": long}])]
    assert len(prompts[-1]) > 150
    before = _generate(vllm_backend, prompts, GREEDY)
    other = AutoModelForCausalLM.from_pretrained(model_dir)
    original = {k: v.clone() for k, v in other.state_dict().items()}
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    ray.get(vllm_backend.update_weights.remote(other.state_dict()))
    after = _generate(vllm_backend, prompts, GREEDY)
    reference = HFGenerationBackend(_cfg(model_dir, stop_token))
    reference.update_weights(other.state_dict())
    expected = reference.generate(prompts, GREEDY)
    assert [c.token_ids for c in after] == [c.token_ids for c in expected]
    assert [c.token_ids for c in after] != [c.token_ids for c in before]
    for completion, reference_completion in zip(after, expected, strict=True):
        # weights perturbed this much give logits several times larger, and the engine's float32
        # kernels (picked per CPU) round them differently from torch's: 1.4e-4 on an Intel Xeon
        assert completion.logprobs == pytest.approx(reference_completion.logprobs, abs=5e-4)
    ray.get(vllm_backend.update_weights.remote(original))
    assert [c.token_ids for c in _generate(vllm_backend, prompts, GREEDY)] == [c.token_ids for c in before]


def test_a_tensor_parallel_engine_generates_and_takes_weight_updates_like_one(model_dir, stop_token, hf, prompts,
                                                                              ray_session):
    """Two shards (worker processes of the engine's own, each on one core): the HF backend's greedy
    tokens and log-probs, before and after weight updates that the engine's actor hands on to the
    shards bucket by bucket through shared memory (a whole state dict, then a stream of many small
    buckets, more than the two it keeps out at once), none left behind."""
    from posttrain.rollout.vllm import VLLMGenerationBackend
    from posttrain.train.weight_transfer import TensorSpec, plan_buckets

    cfg = _cfg(model_dir, stop_token)
    cfg.generation.vllm.tensor_parallel_size = 2
    files_before = _shared_buckets()
    actor = ray.remote(VLLMGenerationBackend).remote(cfg)
    try:
        reference = HFGenerationBackend(_cfg(model_dir, stop_token))
        for round_ in range(3):
            ours, theirs = _generate(actor, prompts, GREEDY), reference.generate(prompts, GREEDY)
            assert [c.token_ids for c in ours] == [c.token_ids for c in theirs]
            for completion, expected in zip(ours, theirs, strict=True):
                # the shards' partial sums are added in another order than one matmul's
                assert completion.logprobs == pytest.approx(expected.logprobs, abs=5e-4)
            if round_ == 2:
                break
            other = AutoModelForCausalLM.from_pretrained(model_dir)
            torch.manual_seed(round_)
            with torch.no_grad():
                for p in other.parameters():
                    p.add_(torch.randn_like(p) * 0.5)
            weights = other.state_dict()
            if round_ == 0:
                ray.get(actor.update_weights.remote(weights))
            else:
                buckets = plan_buckets([TensorSpec(n, tuple(t.shape), t.dtype) for n, t in weights.items()], 2**15)
                assert len(buckets) > 2
                ray.get(actor.load_weights.remote(list(weights.items()), buckets))
            reference.update_weights(weights)
            assert [c.token_ids for c in reference.generate(prompts, GREEDY)] != [c.token_ids for c in theirs]
        assert _shared_buckets() == files_before  # each removed once both shards had read it
    finally:
        ray.kill(actor)
