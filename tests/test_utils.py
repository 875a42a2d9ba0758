"""``polyak.utils``: the byte formatter and the natural sort key the merge and CLI share."""

from __future__ import annotations

import random

import pytest

from polyak.utils import format_bytes, natural_key


@pytest.mark.parametrize(
    "n, text",
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (1536, "1.5 KiB"),
        (2**20 - 1, "1024.0 KiB"),  # rounds up in print, but stays in the smaller unit
        (3 * 2**20, "3.0 MiB"),
        (2.5 * 2**30, "2.5 GiB"),
        (2**40, "1.0 TiB"),
        (4096 * 2**40, "4096.0 TiB"),  # no unit above TiB
        (-2048, "-2.0 KiB"),
    ],
)
def test_format_bytes(n, text):
    assert format_bytes(n) == text


def test_natural_key_orders_numbers_by_value():
    names = [f"epoch_{i}.safetensors" for i in range(1, 13)] + ["final.safetensors"]
    shuffled = names[:]
    random.Random(0).shuffle(shuffled)
    assert sorted(shuffled, key=natural_key) == names
    assert sorted(["b2", "a10", "a9", "a"], key=natural_key) == ["a", "a9", "a10", "b2"]
    # Runs of digits compare as integers: leading zeros do not change the value.
    assert natural_key("step_007") == natural_key("step_7")
    assert sorted(["ckpt-1000", "ckpt-200", "ckpt-30"], key=natural_key) == [
        "ckpt-30", "ckpt-200", "ckpt-1000",
    ]  # fmt: skip
