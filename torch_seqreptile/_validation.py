"""Argument checks whose errors name the argument and the accepted range."""

from __future__ import annotations

import math


def check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= {minimum}, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value}")
    return value


def check_float(name: str, value: object, low: float, high: float, *, open_high: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    value = float(value)
    bracket = ")" if open_high else "]"
    inside = low <= value < high if open_high else low <= value <= high
    if not inside or math.isnan(value):
        raise ValueError(f"{name} must be in [{low}, {high}{bracket}, got {value}")
    return value


def check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value
