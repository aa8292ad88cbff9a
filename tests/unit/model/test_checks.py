"""One check per kind of value (model/checks.py), the same from the config, a request or argv."""
from __future__ import annotations

import argparse
import doctest

import pytest

from rswap_ebpf.cli import args as args_
from rswap_ebpf.errors import ConfigError
from rswap_ebpf.model import checks
from rswap_ebpf.model.checks import check_bool, check_fraction, check_number, check_whole
from rswap_ebpf.predict.registry import make_forecaster
from rswap_ebpf.runtime import config


def test_docstring_examples_hold():
    assert doctest.testmod(checks).failed == 0


@pytest.mark.parametrize("check,value,message", [
    (lambda v: check_number(v, "f", 0, 10), True, "expected a number"),
    (lambda v: check_number(v, "f", 0, 10), float("nan"), "between 0 and 10"),
    (lambda v: check_number(v, "f", 1), 0.5, "at least 1"),
    (lambda v: check_whole(v, "f"), 1.5, "whole number"),
    (lambda v: check_whole(v, "f"), False, "whole number"),
    (lambda v: check_whole(v, "f", 1), 0, "1 or more"),
    (lambda v: check_bool(v, "f"), "false", "true or false"),
    (lambda v: check_fraction(v, "f"), 1.0, "exclusive"),
    (lambda v: check_fraction(v, "f"), "x", "between 0 and 1"),
])
def test_each_check_names_the_field_and_what_it_wants(check, value, message):
    with pytest.raises(ConfigError, match=message) as err:
        check(value)
    assert err.value.field == "f"


def test_config_file_and_forecaster_parameters_give_the_same_answer():
    """The daemon's bool and a forecaster's bool are one check: same words for the same slip."""
    with pytest.raises(ConfigError, match="expected true or false") as in_forecaster:
        make_forecaster({"name": "auto", "floor": "false"})
    assert in_forecaster.value.field == "forecaster.floor"
    with pytest.raises(ConfigError, match="must be between 0.05 and 3600"):
        config.parse("[daemon]\ninterval = 0.01\n[[task]]\nname = \"a\"\ncommand = [\"true\"]\n")


def test_command_line_types_use_the_same_checks():
    assert args_.interval("0.5") == 0.5 and args_.count("3") == 3 and args_.port("0") == 0
    for parse, text, message in ((args_.interval, "0.01", "between 0.05 and 3600"),
                                 (args_.interval, "soon", "expected seconds"),
                                 (args_.count, "0", "1 or more"), (args_.port, "70000", "65535")):
        with pytest.raises(argparse.ArgumentTypeError, match=message):
            parse(text)
