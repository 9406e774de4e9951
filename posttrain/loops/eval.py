"""Evaluation: n samples per problem, scored by the math verifier (or another environment),
summarised as pass@k / maj@k.

Generation runs in-process through the same backend and episode loop GRPO uses, so a checkpoint is
evaluated with exactly the prompts (chat template, system prompt, tools), turns and answer checking
it was trained on.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import transformers
from rich.console import Console
from rich.table import Table

from posttrain.config import DataConfig, EvalRunConfig, to_dict
from posttrain.data.prompts import PromptDataset
from posttrain.envs.registry import check_env_config, load_tools, services_of
from posttrain.envs.worker import EnvironmentWorker
from posttrain.eval.benchmarks import load_eval_rows
from posttrain.eval.metrics import mean_metrics, problem_metrics
from posttrain.logging import make_progress
from posttrain.rollout.base import SamplingParams
from posttrain.rollout.chat_model import ChatModel
from posttrain.rollout.multi_turn import run_episodes
from posttrain.rollout.registry import backend_class

_UNKNOWN_CONTEXT = 10**9  # a model config without max_position_embeddings: no limit of ours


@dataclass
class EvalResult:
    metrics: dict[str, float]
    problems: list[dict[str, Any]]
    report_path: Path | None


def run_eval(cfg: EvalRunConfig, console: Console | None = None) -> EvalResult:
    cfg.check()  # a config built in Python is checked as a loaded one is
    console = console or Console()
    check_env_config(cfg.env)  # before the model loads
    policy_cfg = cfg.generation.to_policy_config()
    backend = backend_class(policy_cfg.generation.backend)(policy_cfg)
    source, prompt_key, answer_key = load_eval_rows(cfg.data)
    prompt_cfg = DataConfig(prompt_key=prompt_key, answer_key=answer_key, system_prompt=cfg.data.system_prompt)
    tools = load_tools(cfg.env.tools) or None
    # Eval has no training sequence length: the model's context bounds a prompt and all its turns.
    context_limit = backend.context_length or _UNKNOWN_CONTEXT
    prompts = PromptDataset(source, backend.tokenizer, prompt_cfg, context_limit - 1, tools,
                            "the model's context length, less one token to generate").prompts
    n, g = cfg.eval.num_tests_per_prompt, cfg.generation
    console.print(f"Eval: {g.model_name} on {source.name}; {len(prompts)} problems x {n} sample(s)")

    expanded = [p for p in prompts for _ in range(n)]
    sampling = SamplingParams(g.max_new_tokens, g.temperature, g.top_p, g.top_k, g.stop_strings)
    # The judge (env.name=judge, math_judge) is served here, beside the model under test.
    services = {"judge": [ChatModel(cfg.env.judge, policy_cfg.precision)]} if "judge" in services_of(cfg.env) else {}
    env = EnvironmentWorker(cfg.env, services=services)  # in the main thread, so math_verify's timeouts are on
    completions, rewards, infos = [], [], []
    start = time.perf_counter()
    transformers.set_seed(cfg.eval.seed)  # samples depend only on the seed, not on what loading drew
    with make_progress(console) as progress:
        task = progress.add_task("eval", total=len(expanded), info="")
        for begin in range(0, len(expanded), g.batch_size):
            chunk = expanded[begin : begin + g.batch_size]
            done, outcomes = run_episodes(chunk, backend.generate, env.step, backend.tokenizer, sampling,
                                          cfg.eval.max_rollout_turns, context_limit, tools)
            completions += done
            rewards += [o.reward for o in outcomes]
            infos += [o.metadata for o in outcomes]
            running = sum(r == 1.0 for r in rewards) / len(rewards)
            progress.update(task, advance=len(chunk), info=f"accuracy {running:.3f}")
    elapsed_s = time.perf_counter() - start

    problems = []
    for i, prompt in enumerate(prompts):
        samples = []
        for j in range(i * n, (i + 1) * n):
            info = infos[j]
            samples.append({"response": completions[j].text, "extracted_answer": info.get("extracted_answer"),
                            "correct": rewards[j] == 1.0, "finish_reason": completions[j].finish_reason,
                            "num_tokens": completions[j].num_sampled, "turns": info["turns"],
                            **({"error": info["reward_error"]} if "reward_error" in info else {}),
                            **({"judge_reply": info["judge_reply"]} if "judge_reply" in info else {})})
        metrics = problem_metrics([s["extracted_answer"] for s in samples], [s["correct"] for s in samples],
                                  cfg.eval.k_values)
        problems.append({"index": i, "messages": prompt.messages, "answer": prompt.metadata["answer"],
                         "metrics": metrics, "samples": samples})
    metrics = mean_metrics([p["metrics"] for p in problems])
    report = {"metrics": metrics, "num_problems": len(problems), "num_tests_per_prompt": n,
              "dataset": source.name, "time_s": elapsed_s, "config": to_dict(cfg), "problems": problems}

    report_path = None
    if cfg.eval.save_path:
        report_path = Path(cfg.eval.save_path)
        report_path.parent.mkdir(parents=True, exist_ok=True)
        report_path.write_text(json.dumps(report, indent=2, ensure_ascii=False))
    console.print(metrics_table(metrics, f"{g.model_name} | {source.name} | n={n}"))
    if report_path is not None:
        console.print(f"report: {report_path}")
    return EvalResult(metrics, problems, report_path)


def metrics_table(metrics: dict[str, float], title: str) -> Table:
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in metrics.items():
        table.add_row(key, f"{value:.4f}")
    return table
