"""A learned reward: a reward model trained with `posttrain rm` scores each (prompt, response).

The conversation and response are tokenized exactly as the reward model saw its preference
pairs during training (the chat template with the response as the assistant's turn, or plain
prompt + response + EOS for a tokenizer without one), then scored in padded batches. The reward
is the raw score: GRPO's group baseline and normalisation make its offset and scale irrelevant.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

from posttrain.config import ConfigError, EnvConfig
from posttrain.data.collate import pad_batch
from posttrain.data.conversations import Sample, tokenize_conversation, tokenize_prompt_completion
from posttrain.envs.base import Environment, EnvStepResult, Message
from posttrain.train.model import resolve_device, resolve_model_source
from posttrain.train.reward_model import has_reward_head, sequence_scores


class RewardModelScorer:
    """One copy of the reward model, scoring tokenized samples in padded batches of `batch_size`.
    GRPO runs these as a worker group of their own (`env.reward_model_workers`, each with
    `env.reward_model_gpus` of a GPU, in `policy.precision`), which the environment actors share;
    eval and tests score in their own process."""

    def __init__(self, path: str, dtype: str = "float32", batch_size: int = 32, *, rank: int = 0,
                 world_size: int = 1):
        try:
            is_rm = has_reward_head(path)
        except OSError as err:
            raise ConfigError(f"env.reward_model_path={path!r}: cannot load its config: {err}") from err
        if not is_rm:
            raise ConfigError(f"env.reward_model_path={path!r} is not a reward model (no sequence-classification "
                              "head); train one with `posttrain rm` and use its final_model folder")
        self.device = resolve_device("auto")
        self.batch_size = batch_size
        source = resolve_model_source(path, "env.reward_model_path")  # a cached hub id loads without retries
        self.model = AutoModelForSequenceClassification.from_pretrained(source, dtype=getattr(torch, dtype))
        self.model = self.model.to(self.device).eval()
        if self.model.config.pad_token_id is None:
            raise ConfigError(f"env.reward_model_path={path!r}: the model config has no pad_token_id, so padded "
                              "batches would be scored at the wrong token")

    @torch.no_grad()
    def score(self, samples: list[Sample]) -> list[float]:
        scores: list[float] = []
        for start in range(0, len(samples), self.batch_size):
            batch = pad_batch(samples[start : start + self.batch_size], self.model.config.pad_token_id)
            batch = {k: v.to(self.device) for k, v in batch.items() if k != "loss_mask"}
            scores += sequence_scores(self.model, batch).float().tolist()
        return scores


class RewardModelEnvironment(Environment):
    services = ("reward_model",)
    """Reward = the reward model's score of the response; a sample that cannot be tokenized is
    invalid ("reward_error"). `reward_model`: a scorer shared with other environment actors (a
    client of GRPO's reward-model workers); None loads one here."""

    def __init__(self, cfg: EnvConfig, *, rank: int = 0, world_size: int = 1, reward_model: Any = None):
        super().__init__(cfg, rank=rank, world_size=world_size)
        path = cfg.reward_model_path
        if not path:
            raise ConfigError("env.reward_model_path is required with env.name=reward_model "
                              "(a folder exported by `posttrain rm`)")
        self.reward_model = reward_model or RewardModelScorer(path, batch_size=cfg.reward_model_batch_size)
        source = resolve_model_source(path, "env.reward_model_path")
        self.tokenizer = AutoTokenizer.from_pretrained(source)
        self.max_length = getattr(AutoConfig.from_pretrained(source), "max_position_embeddings", None) or 4096

    def step(self, conversations: list[list[Message]], responses: list[str],
             metadata: list[dict[str, Any]]) -> EnvStepResult:
        self._check_batch(conversations, responses, metadata)
        n = len(responses)
        rewards = [self.cfg.error_reward] * n
        infos: list[dict[str, Any]] = [{} for _ in range(n)]
        invalid: list[str | None] = [None] * n
        samples: dict[int, Sample] = {}
        for i, (conversation, response) in enumerate(zip(conversations, responses, strict=True)):
            try:
                samples[i] = self.tokenize(conversation, response)
            except Exception as exc:
                infos[i]["reward_error"], invalid[i] = repr(exc), "reward_error"
        scores = self.reward_model.score(list(samples.values())) if samples else []
        for i, score in zip(samples, scores, strict=True):
            rewards[i] = score
        return EnvStepResult(rewards, [[] for _ in range(n)], [True] * n, infos, invalid)

    def tokenize(self, conversation: list[Message], response: str) -> Sample:
        """The same token sequence as `PreferenceDataset` builds for a chosen or rejected reply."""
        if getattr(self.tokenizer, "chat_template", None):
            messages = conversation + [{"role": "assistant", "content": response}]
            return tokenize_conversation(self.tokenizer, messages, self.max_length, trainable_from=len(conversation))
        prompt = "\n".join(m["content"] for m in conversation)
        return tokenize_prompt_completion(self.tokenizer, prompt, response, self.max_length)
