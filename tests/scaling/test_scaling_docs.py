"""The docstring examples of every scaling module run and give what they show."""

import doctest

import pytest

import scaling
from scaling import (
    batch_plan,
    batch_ramp,
    batch_size,
    laws,
    noise,
    recommendation,
    tradeoff,
    weight_decay,
)


@pytest.mark.parametrize(
    "module",
    [batch_size, batch_ramp, batch_plan, weight_decay, tradeoff, laws, noise, recommendation],
)
def test_docstring_examples(module):
    result = doctest.testmod(module, raise_on_error=False, verbose=False)
    assert result.attempted > 0 and result.failed == 0


def test_public_api_is_flat_and_complete():
    for name in scaling.__all__:
        assert getattr(scaling, name) is not None
    assert callable(scaling.recommend) and callable(scaling.current_b_simple)
    assert len(set(scaling.__all__)) == len(scaling.__all__)
