"""Staleness is a distance in the registry's lineage tree, and unknown adapters are unknown, not a crash."""

from __future__ import annotations

import pytest

from nightly_train.data import PolicyLineage, policy_kind

# base -> 1 -> 2 -> 3 ; 2 -> 4 (trained after a rollback from 3 to 2) ; base -> 5 (a fresh start)
PARENTS = {"1": None, "2": "1", "3": "2", "4": "2", "5": None}


@pytest.mark.parametrize("current, sample, distance", [
    ("3", "3", 0),
    ("3", "2", 1),
    ("3", None, 3),      # the base student's samples
    ("2", "3", 1),       # after a rollback to 2, v3 (trained from 2) is one step away, not "newer, so 0"
    ("4", "3", 2),       # siblings: 4 -> 2 -> 3
    ("5", "3", 4),       # 5 -> base -> 1 -> 2 -> 3
    (None, "1", 1),
])
def test_staleness_is_the_tree_distance(current, sample, distance):
    assert PolicyLineage(current, PARENTS).staleness(sample) == distance


def test_an_adapter_the_registry_does_not_know_has_no_staleness():
    assert PolicyLineage("3", PARENTS).staleness("exp-7") is None


def test_a_champion_missing_from_the_registry_makes_every_sample_unknown():
    assert PolicyLineage("9", PARENTS).staleness("3") is None


def test_a_cycle_in_hand_edited_tags_is_unknown_not_a_hang():
    assert PolicyLineage("a", {"a": "b", "b": "a"}).staleness("a") is None


@pytest.mark.parametrize("staleness, kind", [(0, "current"), (2, "older"), (3, "older"), (4, "too_stale"),
                                             (None, "unknown")])
def test_policy_kinds(staleness, kind):
    assert policy_kind(staleness, max_staleness=3) == kind
