"""User-set numbers: one sentence naming the setting, the value and what to give instead.

Messages are compared whole: they are what a user reads, so a changed word is a changed behaviour."""

from __future__ import annotations

import pytest

from bundle.errors import BundleInputError
from bundle.validation import check_image_size, check_sampling_values, number
from bundle.workflow import TimeBudget, set_threads


@pytest.mark.parametrize("value, kind, minimum, strictly, message", [
    ("abc", float, None, False, "--x 'abc' is not a number: give e.g. 1.0."),
    (None, int, None, False, "--x 'None' is not a number: give e.g. 1."),
    (float("nan"), float, None, False, "--x nan is not finite: give e.g. 1.0."),
    ("inf", float, 0, False, "--x inf is not finite: give e.g. 1.0."),
    (2.5, int, None, False, "--x 2.5 is not a whole number: give e.g. 1."),
    (-1, float, 0, False, "--x -1 must be at least 0: give e.g. 1.0."),
    (0, float, 0, True, "--x 0 must be above 0: give e.g. 1.0."),
    (-0.5, float, 0, True, "--x -0.5 must be above 0: give e.g. 1.0."),
])
def test_bad_numbers_are_named(value, kind, minimum, strictly, message):
    with pytest.raises(BundleInputError) as err:
        number("x", value, kind, minimum, strictly=strictly)
    assert str(err.value) == message


def test_good_numbers_pass_through_with_their_type_and_bounds_are_inclusive_unless_strict():
    assert number("x", "3", int, 1) == 3 and isinstance(number("x", "3", int), int)
    assert number("x", "3.0", int) == 3 and isinstance(number("x", 3.0, int), int)
    assert number("x", "0.5", float, 0, strictly=True) == 0.5 and isinstance(number("x", 2, float), float)
    assert number("x", 0, float, 0) == 0.0 and number("x", 1, int, 1) == 1  # the minimum itself is allowed
    assert number("x", -5, float) == -5.0  # no minimum: any finite value
    with pytest.raises(BundleInputError) as err:
        number("steps", 0, int, minimum=1, example=50)
    assert str(err.value) == "--steps 0 must be at least 1: give e.g. 50."
    with pytest.raises(BundleInputError, match="--max_seconds 0 must be above 0"):
        TimeBudget(0)
    with pytest.raises(BundleInputError, match="--torch_threads 0 must be at least 1"):
        set_threads(0)


def test_image_size_must_survive_every_halving():
    assert check_image_size("64", [2, 2]) == 64 and isinstance(check_image_size(64.0, [2, 2]), int)
    assert check_image_size(8, [2, 1]) == 8 and check_image_size(3) == 3  # no halvings: any whole size
    with pytest.raises(BundleInputError) as err:
        check_image_size(60, [2, 2])
    assert str(err.value) == ("--image_size 60 cannot be halved 4 times (autoencoder, then UNet): "
                              "give a multiple of 16, e.g. 48.")
    with pytest.raises(BundleInputError) as err:
        check_image_size(12, [2, 2])  # smaller than one multiple: the example is the multiple itself
    assert str(err.value).endswith("give a multiple of 16, e.g. 16.")
    with pytest.raises(BundleInputError) as err:
        check_image_size(0, [2])
    assert str(err.value) == "--image_size 0 must be at least 1: give e.g. 64."


@pytest.mark.parametrize("args, message", [
    ((0, 3, 1, 1000), "--num_inference_steps 0 must be at least 1: give e.g. 50."),
    ((2.5, 3, 1, 1000), "--num_inference_steps 2.5 is not a whole number: give e.g. 50."),
    ((1001, 3, 1, 1000), "--num_inference_steps 1001 is more than the 1000 training steps: give e.g. 50."),
    ((50, -1, 1, 1000), "--guidance_scale -1 must be at least 0.0: give e.g. 0 (unconditional), 1 (conditional, "
                        "no guidance) or 3."),
    ((50, float("nan"), 1, 1000), "--guidance_scale nan is not finite: give e.g. 0 (unconditional), 1 (conditional, "
                                  "no guidance) or 3."),
    ((50, 3, 0, 1000), "--sample_batch_size 0 must be at least 1: give e.g. 8."),
    ((50, 3, 2.5, 1000), "--sample_batch_size 2.5 is not a whole number: give e.g. 8."),
    ((50, 3, "two", None), "--sample_batch_size 'two' is not a number: give e.g. 8."),
])
def test_bad_sampling_values_are_named(args, message):
    with pytest.raises(BundleInputError) as err:
        check_sampling_values(*args)
    assert str(err.value) == message


def test_good_sampling_values_pass():
    check_sampling_values(50, 0, 1, 1000)  # guidance 0 is the unconditional model: allowed
    check_sampling_values(1000, 3, 1, 1000)  # as many steps as training steps: allowed
    check_sampling_values(5000, 7.5, 64)  # no schedule given: no upper bound on the steps
    check_sampling_values(1, 1)  # one image at a time by default


def test_config_parts_run_on_the_threads_the_config_names(tmp_path):
    # scripts that use a config's parts (its generation, its heads) without its run list still get --torch_threads
    import torch

    from bundle.cli import config_workflow

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        config_workflow("configs/inference.json", "sample", work_dir=str(tmp_path), torch_threads=1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
