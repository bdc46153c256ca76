"""The nightly train/held-out split is by prompt: exact size, deterministic, order-independent, never starves the KL
gate, and no held-out prompt is ever a training or rollout prompt (n > 1 choices and repeated prompts included)."""

import uuid

import pytest

from nightly_train.pipeline import split_heldout


def _index(n_prompts: int, per_prompt: int = 1, seed: int = 0) -> list[tuple[str, str]]:
    """(trajectory id, prompt hash): `per_prompt` trajectories (n > 1 choices or repeats) of each prompt."""
    return [(str(uuid.UUID(int=seed * 10_000 + p * 10 + c)), f"prompt-{seed}-{p}")
            for p in range(n_prompts) for c in range(per_prompt)]


def _prompts(index, ids):
    by_id = dict(index)
    return {by_id[i] for i in ids}


@pytest.mark.parametrize("n", [3, 5, 8, 16, 17, 100])
def test_the_split_is_a_partition_of_the_right_number_of_prompts(n):
    index = _index(n)
    train, heldout = split_heldout(index, percent=20, minimum=2)
    assert sorted(train + heldout) == sorted(i for i, _ in index)
    assert not set(train) & set(heldout)
    assert len(_prompts(index, heldout)) == max(2, round(n * 0.2))
    assert train, "at least one prompt is left to train on"


def test_every_choice_of_a_held_out_prompt_is_held_out():
    index = _index(20, per_prompt=3)
    train, heldout = split_heldout(index, percent=20, minimum=2)
    assert _prompts(index, train) & _prompts(index, heldout) == set()
    assert len(heldout) == 3 * len(_prompts(index, heldout))


def test_small_windows_always_hold_out_the_minimum():
    for seed in range(200):
        index = _index(16, seed=seed)
        _, heldout = split_heldout(index, percent=20, minimum=2)
        assert len(_prompts(index, heldout)) >= 2


def test_the_split_depends_on_the_set_not_the_order():
    index = _index(40, per_prompt=2)
    train_a, heldout_a = split_heldout(index, 25, 2)
    train_b, heldout_b = split_heldout(list(reversed(index)), 25, 2)
    assert set(heldout_a) == set(heldout_b)
    assert set(train_a) == set(train_b)
    assert train_a == [i for i, _ in index if i in set(train_a)], "each side keeps the input order"


def test_a_two_prompt_window_still_trains_on_one():
    train, heldout = split_heldout(_index(2, per_prompt=2), percent=50, minimum=2)
    assert len(train) == 2
    assert len(heldout) == 2


def test_a_one_prompt_window_holds_nothing_out():
    train, heldout = split_heldout(_index(1, per_prompt=4), percent=50, minimum=2)
    assert len(train) == 4
    assert heldout == []
