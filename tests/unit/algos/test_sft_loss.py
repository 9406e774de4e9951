import math

import torch

from posttrain.algos.sft import nll_loss


def test_nll_loss_matches_hand_computation():
    logprobs = torch.log(torch.tensor([[0.5, 0.25, 0.125], [0.5, 0.5, 0.5]]))
    mask = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 0.0]])
    # masked tokens: -log .5 - log .25 - log .5 = 4 log 2; divided by a global count of 8 tokens
    assert math.isclose(nll_loss(logprobs, mask, 8).item(), 4 * math.log(2) / 8, rel_tol=1e-6)


def test_nll_loss_with_no_targets_is_zero_not_nan():
    assert nll_loss(torch.zeros(1, 3), torch.zeros(1, 3), 0).item() == 0.0
