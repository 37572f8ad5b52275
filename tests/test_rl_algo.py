"""GRPO algorithm pieces with exact, hand-computed values."""

import pytest
import torch

from r1core.data import Problem
from r1core.parallel.comm import run_on_rank0
from r1core.rl import AdvantageEstimator, GRPOConfig, Overlong
from r1core.rl.algo import (
    build_policy_batch,
    group_advantages,
    informative_groups,
    overlong_shaping,
    split_rows,
    truncated_is_weights,
)
from r1core.rl.rewarding import Scorer
from r1core.rollout import Sample


def test_group_advantages_standardize_within_each_group():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 1.0]])
    a = group_advantages(r, AdvantageEstimator.grpo, eps=0.0)
    std0 = torch.tensor([1.0, 0.0, 0.0, 1.0]).std()  # unbiased: sqrt(1/3)
    torch.testing.assert_close(a[0], torch.tensor([0.5, -0.5, -0.5, 0.5]) / std0)
    torch.testing.assert_close(
        a[1], torch.tensor([-0.25, -0.25, -0.25, 0.75]) / torch.tensor([0.0, 0.0, 0.0, 1.0]).std()
    )
    torch.testing.assert_close(a.sum(1), torch.zeros(2), atol=1e-6, rtol=0)


def test_dr_grpo_advantages_are_centered_rewards():
    r = torch.tensor([[2.0, 0.0, 1.0]])
    torch.testing.assert_close(
        group_advantages(r, AdvantageEstimator.dr_grpo), torch.tensor([[1.0, -1.0, 0.0]])
    )


def test_uniform_groups_are_uninformative_and_get_zero_advantage():
    r = torch.tensor([[1.0, 1.0], [0.0, 1.0], [0.0, 0.0]])
    assert informative_groups(r).tolist() == [False, True, False]
    assert group_advantages(r, AdvantageEstimator.grpo)[0].abs().max() == 0


def test_overlong_penalty_is_linear_over_the_buffer():
    lengths = torch.tensor([10, 12, 14, 16])
    delta, keep = overlong_shaping(lengths, lengths == 16, 16, Overlong.penalty, buffer=4, penalty=1.0)
    torch.testing.assert_close(delta, torch.tensor([0.0, 0.0, -0.5, -1.0]))
    assert keep.all()
    _, keep = overlong_shaping(lengths, lengths == 16, 16, Overlong.filter, buffer=4, penalty=1.0)
    assert keep.tolist() == [True, True, True, False]


def test_truncated_is_weights_cap_the_ratio():
    w = truncated_is_weights(
        torch.log(torch.tensor([0.5, 0.9])), torch.log(torch.tensor([0.5, 0.3])), cap=2.0
    )
    torch.testing.assert_close(w, torch.tensor([1.0, 2.0]))


def test_policy_batch_masks_exactly_the_response_targets():
    b = build_policy_batch(
        [[1, 2, 3], [4, 5]], [[6, 7], [8]], [[-0.1, -0.2], [-0.3]], [1.0, -1.0], keep=[True, True], pad_id=0
    )
    assert b["tokens"].tolist() == [[1, 2, 3, 6], [4, 5, 0, 0]]
    assert b["targets"].tolist() == [[2, 3, 6, 7], [5, 8, 0, 0]]
    assert b["mask"].tolist() == [[0, 0, 1, 1], [0, 1, 0, 0]]
    torch.testing.assert_close(b["sampler_logprobs"], torch.tensor([[0, 0, -0.1, -0.2], [0, -0.3, 0, 0]]))
    dropped = build_policy_batch([[1, 2]], [[3]], [[-1.0]], [1.0], keep=[False], pad_id=0)
    assert dropped["mask"].sum() == 0


def test_split_rows_trims_trailing_padding():
    b = build_policy_batch(
        [[1, 2, 3], [4, 5], [9]],
        [[6, 7], [8], [1]],
        [[0.0, 0.0], [0.0], [0.0]],
        [1.0, -1.0, 0.0],
        keep=[True, True, True],
        pad_id=0,
    )
    mbs = split_rows(b, 2)
    assert [m["tokens"].shape for m in mbs] == [(2, 4), (1, 1)]
    assert mbs[1]["mask"].tolist() == [[1.0]]


def test_group_size_below_two_fails_with_a_clear_message():
    with pytest.raises(ValueError, match="rl.group_size=1"):
        GRPOConfig(group_size=1)


def test_scoring_fills_each_samples_weighted_reward_and_named_rewards():
    problem = Problem(prompt="2+2?", answer="4", task="arith")
    texts = ["add\n</think>\n\\boxed{4}", "4\n</think>\nthe answer is 5", "no think \\boxed{4}"]
    samples = [
        Sample(prompt_ids=[1], response_ids=[2], logprobs=[0.0], finish_reason="stop", response_text=t)
        for t in texts
    ]
    Scorer({"accuracy": 1.0, "format": 0.5}).score_samples(samples, [problem] * 3)
    # format: a closed think block before the answer (the prompt opens it); accuracy: the answer is 4
    assert [s.rewards for s in samples] == [
        {"format": 1.0, "accuracy": 1.0},
        {"format": 1.0, "accuracy": 0.0},
        {"format": 0.0, "accuracy": 1.0},
    ]
    assert [s.reward for s in samples] == [1.5, 0.5, 1.0]
    with pytest.raises(ValueError):
        Scorer({"accuracy": 1.0}).score_samples(samples, [problem])


class _FakeDist:
    """torch.distributed as rank `rank` of 2 sees it; broadcast_object_list delivers rank 0's object."""

    def __init__(self, rank: int, from_rank0):
        self.rank, self.from_rank0 = rank, from_rank0

    def is_available(self):
        return True

    def is_initialized(self):
        return True

    def get_world_size(self):
        return 2

    def get_rank(self):
        return self.rank

    def broadcast_object_list(self, box, src):
        assert src == 0 and (self.rank == 0) == (box[0] is not None)
        box[0] = self.from_rank0


def test_run_on_rank0_calls_only_rank0_and_every_rank_gets_its_result(monkeypatch):
    from r1core.parallel import comm

    assert run_on_rank0(lambda a, b=0: a + b, 2, b=3) == 5  # no process group: just the call
    calls = []

    def generate(n):
        calls.append(n)
        return {"batch": n}

    for rank in (0, 1):
        monkeypatch.setattr(comm, "dist", _FakeDist(rank, {"batch": 7}))
        assert run_on_rank0(generate, 7) == {"batch": 7}
    assert calls == [7]  # rank 0 generated, rank 1 only received
