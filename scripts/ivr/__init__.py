"""Shared code for the in-place vocabulary reassignment (IVR) workflow's scripts."""
