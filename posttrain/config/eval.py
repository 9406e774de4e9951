"""Evaluation: the run config of `posttrain eval`, which generates in-process."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from posttrain.config.loader import positive, require
from posttrain.config.sections import (
    ColocatedConfig,
    EnvConfig,
    GenerationConfig,
    PolicyConfig,
    TokenizerConfig,
    check_env,
    check_generation,
)


@dataclass
class EvalGenerationConfig(GenerationConfig):
    """`policy.generation` plus the model fields a generation backend needs; eval generates in-process."""

    model_name: str = ""  # HF hub name or local path (e.g. a `posttrain convert` output); required
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    precision: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    device: str = "auto"
    trust_remote_code: bool = False
    temperature: float = 0.0  # greedy, as NeMo RL's eval defaults; sample (> 0) when num_tests_per_prompt > 1

    def to_policy_config(self) -> PolicyConfig:
        """The PolicyConfig the generation backend is built from (no training fields are used)."""
        gen_fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(GenerationConfig)}
        gen_fields["colocated"] = ColocatedConfig(enabled=False)  # eval generates alone, no trainer beside it
        return PolicyConfig(model_name=self.model_name, tokenizer=self.tokenizer, precision=self.precision,
                            device=self.device, trust_remote_code=self.trust_remote_code,
                            generation=GenerationConfig(**gen_fields))


@dataclass
class EvalDataConfig:
    # A benchmark (HF name or short alias: HuggingFaceH4/MATH-500 or math500, HuggingFaceH4/aime_2024 or
    # aime2024, openai/gsm8k or gsm8k), a local .jsonl/.json/.parquet file, or another HF dataset.
    dataset_name: str = "HuggingFaceH4/MATH-500"
    dataset_config: str | None = None  # HF subset; null: the benchmark's own (gsm8k: main)
    split: str | None = None  # null: the benchmark's own split, else "test"
    prompt_key: str | None = None  # null: the benchmark's column, else "prompt"
    answer_key: str | None = None  # null: the benchmark's column, else "answer"
    system_prompt: str | None = "Solve the problem step by step and put the final answer in \\boxed{}."
    max_samples: int | None = None  # evaluate only the first N problems; null: all


@dataclass
class EvalConfig:
    num_tests_per_prompt: int = 1  # samples per problem (n of pass@k)
    k_values: list[int] = field(default_factory=lambda: [1])  # pass@k and maj@k for each k <= num_tests_per_prompt
    seed: int = 42
    save_path: str | None = "results/eval/report.json"  # the JSON report; null disables writing it
    max_rollout_turns: int = 1  # turns per episode with a multi-turn environment (env.name=python_tool, tools, ...)


@dataclass
class EvalRunConfig:
    generation: EvalGenerationConfig = field(default_factory=EvalGenerationConfig)
    data: EvalDataConfig = field(default_factory=EvalDataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    # Scores the samples, in-process (env.num_workers is not used): the math verifier by default, or
    # any GRPO environment, e.g. python_tool with eval.max_rollout_turns > 1 for a tool-using model
    env: EnvConfig = field(default_factory=EnvConfig)

    def check(self) -> None:
        g, d, e = self.generation, self.data, self.eval
        require(bool(g.model_name), "generation.model_name is required (a Hugging Face name or a local path)")
        positive(self, "generation.max_new_tokens", "generation.batch_size", "eval.num_tests_per_prompt")
        require(g.num_workers == 1, f"generation.num_workers must be 1 (eval generates in-process), got "
                                    f"{g.num_workers}")
        require(self.env.runtime_env is None, "env.runtime_env sets up GRPO's environment actors; eval scores "
                                              "in its own process, so install the environment's packages here "
                                              "and leave env.runtime_env unset")
        require(g.temperature >= 0, f"generation.temperature must be >= 0 (0 is greedy), got {g.temperature}")
        require(0 < g.top_p <= 1, f"generation.top_p must be in (0, 1], got {g.top_p}")
        require(g.top_k is None or g.top_k >= 0,
                f"generation.top_k must be >= 0 or null (0 and null: no top-k filter), got {g.top_k}")
        require(not (g.temperature == 0 and e.num_tests_per_prompt > 1),
                f"generation.temperature=0 (greedy) makes all {e.num_tests_per_prompt} samples of a problem "
                "identical; set generation.temperature > 0 or eval.num_tests_per_prompt=1")
        check_generation(g, "generation")
        require(e.max_rollout_turns >= 1, f"eval.max_rollout_turns must be >= 1, got {e.max_rollout_turns}")
        check_env(self.env)
        require(bool(e.k_values), "eval.k_values must list at least one k")
        for k in e.k_values:
            require(1 <= k <= e.num_tests_per_prompt,
                    f"eval.k_values: each k must be in [1, eval.num_tests_per_prompt={e.num_tests_per_prompt}], "
                    f"got {k}")
        require(d.max_samples is None or d.max_samples > 0, f"data.max_samples must be > 0 or null, got "
                                                              f"{d.max_samples}")
