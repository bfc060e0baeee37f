"""User-set numbers: one sentence naming the setting, the value and what to give instead."""

from __future__ import annotations

import pytest

from bundle.errors import BundleInputError
from bundle.validation import check_image_size, check_sampling_values, number
from bundle.workflow import TimeBudget, set_threads


@pytest.mark.parametrize("value, kind, minimum, strictly, message", [
    ("abc", float, None, False, "--x 'abc' is not a number"),
    (float("nan"), float, None, False, "--x nan is not finite"),
    ("inf", float, 0, False, "--x inf is not finite"),
    (2.5, int, None, False, "--x 2.5 is not a whole number"),
    (-1, float, 0, False, "--x -1 must be at least 0"),
    (0, float, 0, True, "--x 0 must be above 0"),
])
def test_bad_numbers_are_named(value, kind, minimum, strictly, message):
    with pytest.raises(BundleInputError, match=message):
        number("x", value, kind, minimum, strictly=strictly)


def test_good_numbers_pass_through_with_their_type():
    assert number("x", "3", int, 1) == 3 and isinstance(number("x", "3", int), int)
    assert number("x", "0.5", float, 0, strictly=True) == 0.5
    assert check_image_size("64", [2, 2]) == 64
    check_sampling_values(50, 0, 1, 1000)  # guidance 0 is the unconditional model: allowed
    with pytest.raises(BundleInputError, match="more than the 1000 training steps"):
        check_sampling_values(1001, 3, 1, 1000)
    with pytest.raises(BundleInputError, match="--max_seconds 0 must be above 0"):
        TimeBudget(0)
    with pytest.raises(BundleInputError, match="--torch_threads 0 must be at least 1"):
        set_threads(0)
