"""Multistep methods: steppers that keep a history of ``f`` across the steps of a solve."""
from .adams_step import AdamsStepper

__all__ = ["AdamsStepper"]
