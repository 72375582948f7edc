"""The replay lab: the incident reproduced in real test containers."""
from .container import Lab, LabSpec, down, leftovers, list_labs, up
from .errors import LabError

__all__ = ["Lab", "LabSpec", "LabError", "down", "leftovers", "list_labs", "up"]
