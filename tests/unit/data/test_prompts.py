"""RL prompts: the reference answer the environment checks is validated, never stringified blindly."""

import pytest

from posttrain.config import DataConfig
from posttrain.data.prompts import PromptDataset
from posttrain.data.sources import DataError, RowSource
from posttrain.demo.tiny_model import build_tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def prompts(tokenizer, rows):
    return PromptDataset(RowSource(rows, "p.jsonl", list(range(1, len(rows) + 1))), tokenizer, DataConfig(), 1000)


def test_number_answers_become_text(tokenizer):
    dataset = prompts(tokenizer, [{"prompt": "1+2?", "answer": 3}, {"prompt": "1/2?", "answer": 0.5}])
    assert [p.metadata["answer"] for p in dataset.prompts] == ["3", "0.5"]


@pytest.mark.parametrize("answer, pattern", [
    (None, "field 'answer' must be a string or a number, got NoneType"),
    (["3"], "field 'answer' must be a string or a number, got list"),
    (True, "field 'answer' must be a string or a number, got bool"),
    (" ", "field 'answer' is empty"),
])
def test_bad_answer_names_the_line(tokenizer, answer, pattern):
    with pytest.raises(DataError, match=pattern) as info:
        prompts(tokenizer, [{"prompt": "q", "answer": "1"}, {"prompt": "q", "answer": answer}])
    assert str(info.value).startswith("p.jsonl, line 2: ")
