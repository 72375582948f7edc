"""Errors the lab reports as one-line causes."""


class LabError(Exception):
    """A lab operation failed; str(e) is a one-line cause for the user."""
