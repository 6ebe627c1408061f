"""Argument types shared by the subcommands: each parses one value or raises an
``argparse.ArgumentTypeError`` that says what was expected and what was given."""
import argparse
from typing import Callable, TypeVar

Number = TypeVar("Number", int, float)


def _parse(text: str, convert: Callable[[str], Number], expected: str) -> Number:
    """``convert(text)``, or an ArgumentTypeError saying ``expected`` when it does not parse."""
    try:
        return convert(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None


def positive_int(text: str) -> int:
    value = _parse(text, int, "a positive integer")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = _parse(text, int, "a non-negative integer")
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def positive_float(text: str) -> float:
    value = _parse(text, float, "a number")
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = _parse(text, float, "a number")
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value
