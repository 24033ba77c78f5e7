"""Checkers for chapter 0's exercises."""

from chapters.exercises import checker  # noqa: F401
