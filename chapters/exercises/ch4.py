"""Checkers for chapter 4's exercises."""

from chapters.exercises import checker  # noqa: F401
