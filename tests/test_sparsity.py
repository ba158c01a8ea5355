"""SparsitySpec: validation, static sizes, hashing."""

from __future__ import annotations

import pytest

from saitjax.sparsity import SparsityError, SparsitySpec, parse_keep


def test_hierarchical_schedule_counts_are_dynamicvit_floors():
    spec = SparsitySpec.hierarchical(0.7)
    assert spec.locations == (3, 6, 9)
    assert spec.keep_counts(196) == (137, 96, 67)
    assert SparsitySpec.hierarchical(0.9).keep_counts(196) == (176, 158, 142)
    assert SparsitySpec.hierarchical(0.5).keep_counts(196) == (98, 49, 24)


def test_specs_are_hashable_static_values():
    a = SparsitySpec.topk([0.7, 0.49, 0.343], [3, 6, 9])  # lists are normalised to tuples
    b = SparsitySpec.topk((0.7, 0.49, 0.343))
    assert a == b and hash(a) == hash(b) and {a: 1}[b] == 1
    assert a.with_mode("mask") != a
    with pytest.raises(Exception):
        a.rule = "mass"  # frozen


@pytest.mark.parametrize("kwargs, message", [
    (dict(locations=(3,), keep_ratios=(0.0,)), r"outside \(0, 1\]"),
    (dict(locations=(3,), keep_ratios=(1.2,)), r"outside \(0, 1\]"),
    (dict(locations=(3,), keep_ratios=(-0.5,)), r"outside \(0, 1\]"),
    (dict(locations=(3, 6), keep_ratios=(0.7,)), "one keep ratio per location"),
    (dict(locations=(6, 3), keep_ratios=(0.7, 0.5)), "strictly increasing"),
    (dict(locations=(3, 6), keep_ratios=(0.5, 0.7)), "non-increasing"),
    (dict(rule="lottery"), "unknown keep rule"),
    (dict(mode="sparse"), "unknown mode"),
    (dict(locations=(3,), rule="mass"), "needs a threshold"),
    (dict(locations=(3,), rule="mass", threshold=1.5), r"outside \(0, 1\]"),
    (dict(locations=(3,), rule="value", threshold=0.0), "must be positive"),
    (dict(locations=(3,), rule="mass", threshold=0.9, buckets=(0.5, 0.25)), "strictly increasing"),
    (dict(locations=(3,), rule="mass", threshold=0.9, min_keep=0.8, max_keep=0.5), "min_keep"),
])
def test_bad_specs_name_the_problem(kwargs, message):
    with pytest.raises(SparsityError, match=message):
        SparsitySpec(**kwargs)


def test_depth_check_and_dense_detection():
    with pytest.raises(SparsityError, match="do not fit a 4-block model"):
        SparsitySpec.hierarchical(0.7).check_depth(4)
    SparsitySpec.dense().check_depth(4)
    assert SparsitySpec.dense().is_dense and SparsitySpec.topk((1.0, 1.0), (1, 2)).is_dense
    assert not SparsitySpec.hierarchical(0.7).is_dense


def test_bucket_capacities_and_bounds():
    spec = SparsitySpec.adaptive("mass", 0.9, min_keep=0.1, max_keep=0.9)
    assert spec.count_bounds(196) == (20, 176)
    caps = spec.bucket_capacities(196)
    # default buckets 0.25 .. 1.0 of 196 = 49, 73.5, 98, 122.5, 147, 196 -> rounded up to 8
    # (the full 196 stays); the last one (196) already holds K_max = 176, so nothing is appended
    assert caps == (56, 80, 104, 128, 152, 196)
    assert list(caps) == sorted(set(caps)) and all(c % 8 == 0 or c == 196 for c in caps)
    # when the largest bucket is below K_max, K_max itself is appended so every image fits
    assert SparsitySpec.adaptive("mass", 0.9, min_keep=0.1, max_keep=0.9,
                                 buckets=(0.25, 0.5)).bucket_capacities(196) == (56, 104, 176)
    assert SparsitySpec.adaptive("mass", 0.9, buckets=(0.5,)).bucket_capacities(196) == (104, 196)


def test_parse_keep():
    assert parse_keep("1") == SparsitySpec.dense()
    assert parse_keep("0.7") == SparsitySpec.hierarchical(0.7)
    assert parse_keep("0.7,0.49,0.343").keep_ratios == (0.7, 0.49, 0.343)
    with pytest.raises(SparsityError, match="cannot parse"):
        parse_keep("seventy")
    with pytest.raises(SparsityError, match=r"outside \(0, 1\]"):
        parse_keep("0")
