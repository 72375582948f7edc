"""glibc code knowledge: where send_dg is, what to probe in it, and whether the build has
the bug-30081 fix, found from the ELF files alone (see :mod:`.analyzer`)."""
from .analyzer import ANALYZER_VERSION, AnalysisError, analyze_object, analyze_target

__all__ = ["ANALYZER_VERSION", "AnalysisError", "analyze_object", "analyze_target"]
