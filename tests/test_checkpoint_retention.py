"""Retention.select_to_delete is pure: last keep_last + milestones, never the newest verified."""

import pytest

from so8t.checkpoint.retention import Retention


def test_keeps_the_last_n():
    assert Retention(keep_last=3).select_to_delete([1, 2, 3, 4, 5], newest_verified=5) == [1, 2]


def test_keeps_milestones():
    r = Retention(keep_last=2, keep_every_steps=10)
    assert r.select_to_delete([5, 10, 15, 20, 25, 30, 35], newest_verified=35) == [5, 15, 25]


def test_never_deletes_the_newest_verified_even_if_older_than_the_last_n():
    # the two highest are corrupt (not verified): the newest good one survives
    assert Retention(keep_last=2).select_to_delete([1, 2, 3, 4], newest_verified=2) == [1]


def test_unsorted_and_duplicate_input():
    assert Retention(keep_last=1).select_to_delete([3, 1, 2, 3], newest_verified=3) == [1, 2]


def test_nothing_to_delete():
    assert Retention(keep_last=5).select_to_delete([1, 2], newest_verified=None) == []


@pytest.mark.parametrize("args", [(0, None), (1, 0)])
def test_invalid_settings(args):
    with pytest.raises(ValueError):
        Retention(*args)
