"""Adaptation methods: the table of methods lives in adapt/methods.py (importable without torch)."""
