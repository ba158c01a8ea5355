"""Sweep axes of a config's get_sweep(hyper)."""

import pytest

from saitjax import hyper


def test_product_zip_chain_and_fixed():
    grid = hyper.product([hyper.sweep("arg.rho", [0.5, 0.7]), hyper.sweep("config.seed", [0, 1])])
    assert grid == [{"arg.rho": 0.5, "config.seed": 0}, {"arg.rho": 0.5, "config.seed": 1},
                    {"arg.rho": 0.7, "config.seed": 0}, {"arg.rho": 0.7, "config.seed": 1}]
    assert hyper.product(hyper.sweep("arg.rho", [0.5]), hyper.fixed("arg.epochs", 2.0)) == [
        {"arg.rho": 0.5, "arg.epochs": 2.0}]
    assert hyper.zipit([hyper.sweep("arg.rho", [0.5, 0.7]), hyper.sweep("config.optim.lr", [1e-3, 3e-4])]) == [
        {"arg.rho": 0.5, "config.optim.lr": 1e-3},
        {"arg.rho": 0.7, "config.optim.lr": 3e-4}]
    assert hyper.chain(hyper.sweep("arg.rho", [0.5]), hyper.sweep("config.seed", [3])) == [
        {"arg.rho": 0.5}, {"config.seed": 3}]


@pytest.mark.parametrize("build, message", [
    (lambda: hyper.sweep("lr", [1]), "must be 'arg.NAME'"),
    (lambda: hyper.sweep("config.", [1]), "must be 'arg.NAME'"),
    (lambda: hyper.sweep("arg.rho", []), "has no values"),
    (lambda: hyper.zipit(hyper.sweep("arg.a", [1, 2]), hyper.sweep("arg.b", [1])), "one length"),
    (lambda: hyper.product(hyper.sweep("arg.a", [1]), hyper.sweep("arg.a", [2])), "set by two axes"),
])
def test_bad_axes_are_named(build, message):
    with pytest.raises(ValueError, match=message):
        build()
