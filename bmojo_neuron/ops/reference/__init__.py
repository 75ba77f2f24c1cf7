"""Torch reference implementations of the hot ops: the oracle every other backend is tested against."""
