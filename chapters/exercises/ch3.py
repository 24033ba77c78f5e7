"""Checkers for chapter 3's exercises."""

from chapters.exercises import checker  # noqa: F401
