"""Helpers for the test suite that are not fixtures: tool downloads and the like."""
