"""A chat model that answers conversations with text: the judge of env.name=judge and math_judge,
served by the same generation backends as the policy's generators (hf or vllm), in its own workers."""

from __future__ import annotations

from posttrain.config import GenerationConfig, JudgeConfig, PolicyConfig
from posttrain.data.conversations import tokenize_prompt
from posttrain.envs.base import Message
from posttrain.rollout.base import SamplingParams
from posttrain.rollout.registry import backend_class


class ChatModel:
    def __init__(self, judge: JudgeConfig, precision: str = "float32", *, rank: int = 0, world_size: int = 1):
        generation = GenerationConfig(backend=judge.backend, max_new_tokens=judge.max_new_tokens,
                                      temperature=judge.temperature, batch_size=judge.batch_size)
        model = PolicyConfig(model_name=judge.model_name, precision=precision, generation=generation)
        self.backend = backend_class(judge.backend)(model, rank=rank, world_size=world_size)
        self.sampling = SamplingParams(judge.max_new_tokens, judge.temperature)

    def chat(self, conversations: list[list[Message]]) -> list[str]:
        """The model's reply to each conversation, rendered with its chat template."""
        prompts = [tokenize_prompt(self.backend.tokenizer, conversation) for conversation in conversations]
        return [completion.text for completion in self.backend.generate(prompts, self.sampling)]
