"""Checkers for chapter 1's exercises."""

from chapters.exercises import checker  # noqa: F401
