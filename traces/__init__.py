"""Request traces for opscale: the shipped Azure LLM inference traces 2023, loaders for
user traces in the same schemas, and seeded generators fitted to a real trace.

>>> from traces import load_trace
>>> tr = load_trace("azure-conv")
>>> len(tr)
19366
"""
from traces.trace import Trace, TraceError, TraceWarning
from traces.loader import TRACE_NAMES, load_trace
from traces.generate import GENERATORS, generate

__all__ = ["Trace", "TraceError", "TraceWarning", "TRACE_NAMES", "load_trace", "GENERATORS", "generate"]
