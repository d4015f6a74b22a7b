"""The n-gram proposer (prompt lookup) and the acceptance rule, as pure functions."""

from __future__ import annotations

import pytest

from pagedserve.engine.spec.ngram import NgramProposer
from pagedserve.engine.spec.verify import num_accepted


def test_longest_suffix_first_and_latest_occurrence():
    proposer = NgramProposer(3, 1, 3)
    tokens = [1, 2, 3, 4, 9, 2, 3, 5, 6, 1, 2, 3]
    # The suffix (1, 2, 3) occurred at 0..2, followed by 4, 9, 2; the 2-gram (2, 3) later at 5..6 is shorter.
    assert proposer.propose("r", tokens) == [4, 9, 2]
    assert NgramProposer(3, 1, 2).propose("r", tokens) == [5, 6, 1]  # latest (2, 3) wins at n = 2


def test_no_match_and_window_limits():
    proposer = NgramProposer(4, 2, 3)
    assert proposer.propose("r", [1, 2, 3, 4]) == []
    assert proposer.propose("s", [7, 8, 1, 7]) == []  # only a 1-gram matches, below prompt_lookup_min
    assert proposer.propose("t", [7, 8, 1, 7, 8]) == [1, 7, 8]  # truncated at the end of the tokens
    assert proposer.propose("u", [7, 8, 1, 7, 8], max_tokens=1) == [1]
    assert proposer.propose("u", [7, 8, 1, 7, 8, 1], max_tokens=0) == []


def test_index_grows_with_the_tokens():
    proposer = NgramProposer(2, 1, 2)
    tokens = [5, 6, 7]
    assert proposer.propose("r", tokens) == []
    tokens += [5, 6]
    assert proposer.propose("r", tokens) == [7, 5]
    tokens += [8, 5, 6]
    assert proposer.propose("r", tokens) == [8, 5]  # the latest (5, 6) is now followed by 8
    proposer.forget("r")
    assert proposer.propose("r", tokens) == [8, 5]  # rebuilt from scratch: same answer


def test_num_accepted():
    assert num_accepted([4, 5, 6], [4, 5]) == 2
    assert num_accepted([4, 9, 6], [4, 5]) == 1
    assert num_accepted([3], []) == 0
    with pytest.raises(ValueError):
        num_accepted([1, 2], [1, 2])
