"""Checkers for chapter 2's exercises."""

from chapters.exercises import checker  # noqa: F401
