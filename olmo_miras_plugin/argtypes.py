"""argparse value types shared by the scripts: a bad number is refused by argparse itself, which
names the option and the value (exit code 2), before any model is built or loaded."""

from __future__ import annotations

import argparse
import math
from typing import Callable

__all__ = ["int_at_least", "float_at_least"]


def int_at_least(lo: int, why: str = "") -> Callable[[str], int]:
    """An integer >= ``lo``; ``why`` is appended to the error (e.g. what the bound is for)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < lo:
            raise argparse.ArgumentTypeError(f"must be an integer >= {lo}, got {value}{why}")
        return value

    parse.__name__ = f"integer >= {lo}"
    return parse


def float_at_least(lo: float, *, strict: bool = False) -> Callable[[str], float]:
    """A finite number >= ``lo`` (> ``lo`` with ``strict``)."""
    bound = f"> {lo:g}" if strict else f">= {lo:g}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not (math.isfinite(value) and (value > lo if strict else value >= lo)):
            raise argparse.ArgumentTypeError(f"must be a finite number {bound}, got {text}")
        return value

    parse.__name__ = f"number {bound}"
    return parse
