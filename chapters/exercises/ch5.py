"""Checkers for chapter 5's exercises."""

from chapters.exercises import checker  # noqa: F401
