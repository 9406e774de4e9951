"""Multi-turn episodes: token layout, masks, rewards and ends, with scripted generators and a real backend."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from posttrain.config import EnvConfig, PolicyConfig
from posttrain.data.conversations import tokenize_prompt
from posttrain.data.prompts import Prompt
from posttrain.data.trajectories import Trajectory, collate_trajectories
from posttrain.demo.tiny_model import build_tiny_tokenizer
from posttrain.envs.number_guess import NumberGuessEnvironment
from posttrain.envs.registry import load_tools
from posttrain.envs.worker import EnvironmentWorker
from posttrain.rollout.base import Completion, SamplingParams
from posttrain.rollout.hf import HFGenerationBackend
from posttrain.rollout.multi_turn import observation_token_ids, run_episodes
from posttrain.train.logprobs import response_logprobs


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def guess_prompt(tokenizer, secret: int, game: int = 0) -> Prompt:
    messages = [{"role": "user", "content": f"Game {game}: guess my number between 0 and 9."}]
    return Prompt(messages, tokenize_prompt(tokenizer, messages), {"answer": str(secret)})


class ScriptedGenerator:
    """Answers each context with the next scripted text of its episode (found by its prompt)."""

    def __init__(self, tokenizer, prompts: list[Prompt], scripts: list[list[str]], closed: bool = True):
        self.tokenizer, self.closed = tokenizer, closed
        self.scripts = {tuple(p.token_ids): list(s) for p, s in zip(prompts, scripts, strict=True)}
        self.calls: list[tuple[list[list[int]], SamplingParams]] = []

    def __call__(self, contexts: list[list[int]], sampling: SamplingParams) -> list[Completion]:
        self.calls.append((contexts, sampling))
        out = []
        for context in contexts:
            prompt = next(p for p in self.scripts if tuple(context[: len(p)]) == p)
            text = self.scripts[prompt].pop(0)
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            ids = ids + [self.tokenizer.eos_token_id] if self.closed else ids
            ids, reason = (ids[: sampling.max_new_tokens], "length") if len(ids) > sampling.max_new_tokens else (ids, "stop")
            out.append(Completion(ids, [-0.5] * len(ids), reason, self.tokenizer.decode(ids, skip_special_tokens=True)))
        return out


def env_step():
    return EnvironmentWorker(EnvConfig(name="number_guess")).step


def test_observation_tokens_close_the_turn_show_the_hint_and_open_the_next(tokenizer):
    conversation = [{"role": "user", "content": "Guess."}, {"role": "assistant", "content": "3"}]
    hint = [{"role": "user", "content": "Higher."}]
    closed = tokenizer("3", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = observation_token_ids(tokenizer, conversation, hint, closed)
    assert tokenizer.decode(ids) == "\n<|im_start|>user\nHigher.<|im_end|>\n<|im_start|>assistant\n"
    # A response cut by a stop string did not close its turn: the template's end of turn is added.
    ids = observation_token_ids(tokenizer, conversation, hint, closed[:-1])
    assert tokenizer.decode(ids) == "<|im_end|>\n<|im_start|>user\nHigher.<|im_end|>\n<|im_start|>assistant\n"
    # The whole episode's tokens are then exactly the template's rendering of the conversation.
    prompt = tokenize_prompt(tokenizer, conversation[:1])
    full = tokenizer.apply_chat_template(conversation + hint, tokenize=False, add_generation_prompt=True)
    assert tokenizer.decode(prompt + closed[:-1] + ids) == full


def test_a_template_that_cannot_continue_turn_by_turn_is_named(tokenizer):
    odd = build_tiny_tokenizer()
    odd.chat_template = "{% for m in messages|reverse %}{{ m['content'] }}|{% endfor %}"
    with pytest.raises(ValueError, match="chat template cannot continue a conversation turn by turn"):
        observation_token_ids(odd, [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
                              [{"role": "user", "content": "c"}], [5])


def test_episodes_go_on_until_done_or_out_of_turns(tokenizer):
    prompts = [guess_prompt(tokenizer, secret, game) for game, secret in enumerate((7, 2, 5))]
    scripts = [["3", "8", "7"], ["2"], ["9", "1", "4"]]
    generate = ScriptedGenerator(tokenizer, prompts, scripts)
    sampling = SamplingParams(max_new_tokens=8, temperature=1.0, seed=11)
    completions, outcomes = run_episodes(prompts, generate, env_step(), tokenizer, sampling, max_turns=3,
                                         max_total_length=200)

    assert [o.metadata["turns"] for o in outcomes] == [3, 1, 3]
    assert [o.reward for o in outcomes] == [1.0, 1.0, 0.0]  # the third never found its number
    assert [o.done for o in outcomes] == [True, True, False]
    assert [o.metadata["guess"] for o in outcomes] == [7, 2, 4]  # the last turn's metadata
    # Turn by turn only the unfinished episodes are generated for, each from its whole context.
    assert [len(contexts) for contexts, _ in generate.calls] == [3, 2, 2]
    first = completions[0]
    context = generate.calls[2][0][0]
    assert context == prompts[0].token_ids + first.token_ids[: len(context) - len(prompts[0].token_ids)]
    assert tokenizer.decode(first.token_ids) == (
        "3<|im_end|>\n<|im_start|>user\nHigher.<|im_end|>\n<|im_start|>assistant\n"
        "8<|im_end|>\n<|im_start|>user\nLower.<|im_end|>\n<|im_start|>assistant\n7<|im_end|>")
    # Sampled tokens carry their log-probs and mask 1; the environment's carry 0 and 0.
    for completion in completions:
        assert len(completion.mask) == len(completion.token_ids) == len(completion.logprobs)
        assert completion.logprobs == [-0.5 if kept else 0.0 for kept in completion.mask]
    sampled = [t for t, kept in zip(first.token_ids, first.mask, strict=True) if kept]
    assert tokenizer.decode(sampled) == "3<|im_end|>8<|im_end|>7<|im_end|>"
    assert completions[1].mask == [1, 1] and completions[1].text == "2"
    # Each turn samples with its own seed; the first keeps the run's.
    seeds = [s.seed for _, s in generate.calls]
    assert seeds[0] == 11 and len(set(seeds)) == 3


def test_a_response_cut_at_the_token_limit_goes_to_the_environment_and_the_game_goes_on(tokenizer):
    prompt = guess_prompt(tokenizer, 7)
    generate = ScriptedGenerator(tokenizer, [prompt], [["3", "7"]])
    completions, outcomes = run_episodes([prompt], generate, env_step(), tokenizer, SamplingParams(max_new_tokens=1),
                                         max_turns=3, max_total_length=200)
    # Each "N<|im_end|>" is cut to "N"; the environment still reads the guess, and the template's
    # end of turn closes the cut response before the hint.
    assert tokenizer.decode(completions[0].token_ids) == (
        "3<|im_end|>\n<|im_start|>user\nHigher.<|im_end|>\n<|im_start|>assistant\n7")
    assert outcomes[0].reward == 1.0 and outcomes[0].metadata["turns"] == 2
    assert completions[0].finish_reason == "length"  # the last response was cut


def test_one_turn_is_plain_generation(tokenizer):
    prompts = [guess_prompt(tokenizer, 7)]
    generate = ScriptedGenerator(tokenizer, prompts, [["3"]])
    completions, outcomes = run_episodes(prompts, generate, env_step(), tokenizer,
                                         SamplingParams(max_new_tokens=8, seed=3), max_turns=1, max_total_length=200)
    assert completions[0].mask is None and completions[0].text == "3"
    assert outcomes[0].reward == 0.0 and outcomes[0].metadata["turns"] == 1
    assert generate.calls[0][1] == SamplingParams(max_new_tokens=8, seed=3)


@pytest.mark.parametrize("spare", [0, 1])
def test_an_episode_ends_when_the_next_turn_would_not_fit(tokenizer, spare):
    prompt = guess_prompt(tokenizer, 7)
    first = tokenizer("3", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    hint = observation_token_ids(tokenizer, [*prompt.messages, {"role": "assistant", "content": "3"}],
                                 [{"role": "user", "content": "Higher."}], first)
    limit = len(prompt.token_ids) + len(first) + len(hint) + spare
    generate = ScriptedGenerator(tokenizer, [prompt], [["3", "9", "7"]])
    completions, outcomes = run_episodes([prompt], generate, env_step(), tokenizer, SamplingParams(max_new_tokens=8),
                                         max_turns=3, max_total_length=limit)
    if spare:  # room for one more token: the model answers again, cut to it
        assert [s.max_new_tokens for _, s in generate.calls] == [8, 1]
        assert completions[0].token_ids == first + hint + tokenizer("9", add_special_tokens=False)["input_ids"]
    else:  # no room to answer: the episode ends after the first response
        assert len(generate.calls) == 1 and completions[0].token_ids == first
    assert completions[0].finish_reason == "length" and outcomes[0].reward == 0.0


def test_an_error_in_any_turn_is_reported(tokenizer):
    class FailsFirst(NumberGuessEnvironment):
        turn = 0

        def step(self, conversations, responses, metadata):
            result = super().step(conversations, responses, metadata)
            if self.turn == 0:
                result.metadata[0]["reward_error"] = "ValueError('first turn')"
            self.turn += 1
            return result

    env = FailsFirst(EnvConfig())
    prompt = guess_prompt(tokenizer, 7)
    step = lambda items: EnvironmentWorker.step(type("W", (), {"env": env})(), items)  # noqa: E731
    _, outcomes = run_episodes([prompt], ScriptedGenerator(tokenizer, [prompt], [["3", "7"]]), step, tokenizer,
                               SamplingParams(max_new_tokens=8), max_turns=3, max_total_length=200)
    assert outcomes[0].reward == 1.0 and outcomes[0].metadata["reward_error"] == "ValueError('first turn')"


def test_an_invalid_turn_ends_its_episode_with_its_reason(tokenizer):
    class InvalidFirst(NumberGuessEnvironment):
        def step(self, conversations, responses, metadata):
            result = super().step(conversations, responses, metadata)
            result.invalid = ["judge_down"] + [None] * (len(responses) - 1)
            return result

    env = InvalidFirst(EnvConfig())
    prompt = guess_prompt(tokenizer, 7)
    step = lambda items: EnvironmentWorker.step(type("W", (), {"env": env})(), items)  # noqa: E731
    generate = ScriptedGenerator(tokenizer, [prompt], [["3", "7"]])  # a wrong guess: the game would go on
    _, outcomes = run_episodes([prompt], generate, step, tokenizer, SamplingParams(max_new_tokens=8), max_turns=3,
                               max_total_length=200)
    assert outcomes[0].invalid == "judge_down" and outcomes[0].metadata["turns"] == 1 and len(generate.calls) == 1


def test_an_environments_invalid_list_is_checked():
    from posttrain.envs.base import EnvStepResult
    from posttrain.envs.worker import _outcomes

    result = EnvStepResult([0.0, 1.0], [[], []], [True, True], [{}, {}], invalid=["x"])
    with pytest.raises(ValueError, match=r"Env\.step returned invalid=\['x'\]; it must be None or one entry per sample "
                                         r"\(2\), each None \(scored\) or a non-empty reason"):
        _outcomes(result, 2, "Env.step")


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_multi_turn_generator_logprobs_match_the_trainer_forward(tiny_model_dir, temperature):
    """Episodes from the real backend: the trainer's forward over prompt, responses and hints gives
    the generator's log-probs at every sampled token, and no loss lands on the hints."""
    cfg = PolicyConfig(model_name=str(tiny_model_dir), device="cpu")
    # The random tiny model seldom ends a turn by itself: let every even token id end one, so that
    # turns cut at the token limit and turns ended by a stop token both occur.
    cfg.generation.stop_token_ids = list(range(4, 400, 2))
    backend = HFGenerationBackend(cfg)
    tok = backend.tokenizer
    prompts = [guess_prompt(tok, secret) for secret in (3, 6) for _ in range(3)]
    torch.manual_seed(0)
    completions, outcomes = run_episodes(prompts, backend.generate, env_step(), tok,
                                         SamplingParams(max_new_tokens=6, temperature=temperature, seed=5),
                                         max_turns=3, max_total_length=120)
    assert sum(o.metadata["turns"] for o in outcomes) > 2 * len(outcomes)  # a random model seldom guesses right
    trajectories = [Trajectory(p.token_ids, c.token_ids, c.logprobs, 1.0, c.mask)
                    for p, c in zip(prompts, completions, strict=True)]
    batch = collate_trajectories(trajectories, tok.pad_token_id)
    with torch.no_grad():
        trainer = response_logprobs(backend.model, batch, temperature)[0]
    mask = batch["loss_mask"].bool()
    assert mask.sum() == sum(sum(c.mask) for c in completions)
    assert mask.sum() < sum(len(c.token_ids) for c in completions)  # the hints are masked out
    assert (trainer - batch["generator_logprobs"])[mask].abs().max().item() < 1e-3


def test_a_python_tool_episode_runs_code_then_answers(tokenizer):
    messages = [{"role": "user", "content": "What is 6 * 7?"}]
    prompt = Prompt(messages, tokenize_prompt(tokenizer, messages), {"answer": "42"})
    generate = ScriptedGenerator(tokenizer, [prompt], [["```python\nprint(6 * 7)\n```", "So \\boxed{42}"]])
    completions, outcomes = run_episodes([prompt], generate, EnvironmentWorker(EnvConfig(name="python_tool")).step,
                                         tokenizer, SamplingParams(max_new_tokens=32), max_turns=4, max_total_length=300)
    assert outcomes[0].reward == 1.0 and outcomes[0].metadata["turns"] == 2
    # The model's second turn was generated after the program's output.
    assert tokenizer.decode(generate.calls[1][0][0]).endswith(
        "```<|im_end|>\n<|im_start|>user\n```output\n42\n```<|im_end|>\n<|im_start|>assistant\n")


TOOLS_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTools:{% for t in tools %} {{ t.function.name }}{% endfor %}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_a_tool_calling_episode_shows_the_tools_and_their_results(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "envs"))
    tok = build_tiny_tokenizer()
    tok.chat_template = TOOLS_TEMPLATE
    env_cfg = EnvConfig(name="tools", tools=["reward_fns_for_tests:multiply"])
    tools = load_tools(env_cfg.tools)
    messages = [{"role": "user", "content": "What is 6 * 7?"}]
    prompt = Prompt(messages, tokenize_prompt(tok, messages, tools), {"answer": "42"})
    assert tok.decode(prompt.token_ids).startswith("<|im_start|>system\nTools: multiply<|im_end|>")
    tool_call = '<tool_call>{"name": "multiply", "arguments": {"a": 6, "b": 7}}</tool_call>'
    generate = ScriptedGenerator(tok, [prompt], [[tool_call, "It is \\boxed{42}"]])
    completions, outcomes = run_episodes([prompt], generate, EnvironmentWorker(env_cfg).step, tok,
                                         SamplingParams(max_new_tokens=64), max_turns=3, max_total_length=400,
                                         tools=tools)
    assert outcomes[0].reward == 1.0 and outcomes[0].metadata["turns"] == 2
    # The second turn was generated from exactly the template's rendering of the conversation so far.
    conversation = [*messages, {"role": "assistant", "content": tool_call}, {"role": "tool", "content": "42"}]
    assert tok.decode(generate.calls[1][0][0]) == tok.apply_chat_template(conversation, tools=tools, tokenize=False,
                                                                           add_generation_prompt=True)
