"""kaggle_utils.text.truncation: how a cut turn's token budget is shared among prompt, A and B."""

from __future__ import annotations

import math

import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from kaggle_utils.text.truncation import MIN_CUT_SHARE, _share


@pytest.mark.parametrize(
    ("lengths", "budget", "expected"),
    [
        ((50, 3000, 500), 1900, [50, 1350, 500]),  # was [50, 1422, 427]
        ((3000, 3000, 3000), 1900, [634, 633, 633]),  # remainder 1: the prompt
        ((3000, 3000, 3000), 1901, [633, 634, 634]),  # remainder 2: A and B together
        ((10, 3000, 3000), 1901, [10, 945, 945]),  # remainder 1 between A and B: stays unused
        ((3000, 10, 3000), 1901, [946, 10, 945]),
        ((100, 4000, 2000), 1000, [100, 450, 450]),  # both responses cut: the same amount, length hidden
        ((100, 200, 300), 600, [100, 200, 300]),  # everything fits: nothing cut
        ((100, 200, 300), 0, [0, 0, 0]),
    ],
)
def test_equal_split_is_max_min_fair(lengths, budget, expected):
    assert _share(lengths, budget, "equal") == expected


@pytest.mark.parametrize(
    ("lengths", "budget", "expected"),
    [
        ((50, 3000, 500), 1900, [50, 1350, 500]),  # short pieces first, as with "equal"
        ((100, 4000, 2000), 1000, [100, 600, 300]),  # both responses cut: the longer keeps twice as much
        (
            (1000, 3000, 1500),
            1900,
            [345, 1037, 518],
        ),  # 1900 * (1000, 3000, 1500) / 5500, remainder to the longest
        ((700, 800, 100000), 1200, [200, 200, 800]),  # floor: half an equal share (200) for the starved two
        (
            (3000, 3000, 3000),
            1900,
            [634, 633, 633],
        ),  # equal lengths: the equal split, remainder to the prompt
        ((3000, 3000, 3000), 1901, [633, 634, 634]),  # remainder 2: A and B together
        ((10, 3000, 3000), 1901, [10, 945, 945]),  # remainder 1 between A and B: stays unused
        ((3000, 10, 3000), 1901, [945, 10, 946]),  # remainder 1 among equal prompt and B: the response first
        ((100, 200, 300), 600, [100, 200, 300]),
        ((100, 200, 300), 0, [0, 0, 0]),
    ],
)
def test_proportional_split_keeps_the_length_signal(lengths, budget, expected):
    assert _share(lengths, budget, "proportional") == expected


def _water_filled(lengths: tuple[int, int, int], budget: int) -> tuple[set[int], int]:
    """Reference first stage: the pieces that must be cut and the budget they share."""
    left, cut = budget, sorted(range(3), key=lambda k: lengths[k])
    while cut and lengths[cut[0]] * len(cut) <= left:
        left -= lengths[cut.pop(0)]
    return set(cut), left


@given(lengths=st.tuples(*(st.integers(0, 5000) for _ in range(3))), budget=st.integers(0, 9000),
       split=st.sampled_from(["proportional", "equal"]))  # fmt: skip
def test_share_properties(lengths, budget, split):
    alloc = _share(lengths, budget, split)
    assert all(0 <= a <= n for a, n in zip(alloc, lengths, strict=True))
    assert _share((lengths[0], lengths[2], lengths[1]), budget, split) == [
        alloc[0],
        alloc[2],
        alloc[1],
    ]  # A/B
    if sum(lengths) <= budget:
        assert alloc == list(lengths)
        return
    assert budget - 1 <= sum(alloc) <= budget  # at most one token unused
    cut, left = _water_filled(lengths, budget)
    event(f"{split}, {len(cut)} cut")
    for k in set(range(3)) - cut:  # short pieces first: those that fit what is left are kept whole
        assert alloc[k] == lengths[k]
    if split == "equal":
        for k in cut:  # max-min fair: nobody keeps more than a cut piece (+1 rounding)
            assert max(alloc) <= alloc[k] + 1
        return
    floor_share = math.floor(MIN_CUT_SHARE * left / len(cut))
    for i in cut:
        assert alloc[i] >= floor_share  # never starved
        for j in cut:
            if lengths[i] > lengths[j]:  # monotone: the longer never keeps fewer
                assert alloc[i] >= alloc[j]
    # Above the floor, shares follow the lengths (up to rounding).
    above = [k for k in cut if alloc[k] > floor_share + 1]
    kept_above, length_above = sum(alloc[k] for k in above), sum(lengths[k] for k in above)
    for k in above:
        assert abs(alloc[k] - kept_above * lengths[k] / length_above) <= 2
