"""Errors the lab reports as one-line causes."""

from ..errors import GdbdiagError


class LabError(GdbdiagError):
    """A lab operation failed; str(e) is a one-line cause for the user."""
