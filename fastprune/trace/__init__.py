"""Trace one small forward pass at the aten level and relate every tensor dimension.

A :class:`TorchDispatchMode` (:mod:`fastprune.trace.tracer`) sees each aten op with real (small)
tensors.  Each tensor dimension gets an atom in :class:`~fastprune.spaces.Spaces`; the rule of
each op, looked up in one table (:data:`fastprune.trace.rules.RULES`: shape/view, slicing and
indexing, contractions, attention, norms and elementwise ops, routing, constants), relates the
atoms of its inputs and outputs.  Parameters are recognised by identity, so no module names or
model classes are needed.  Ops without a rule block every atom they touch and are reported by
name with the module that ran them; so is a rule that raises (a bug: under
``FASTPRUNE_STRICT_TRACE=1``, which the test suite sets, it raises :class:`TraceRuleError`).
"""

from fastprune.trace.rules import RULES
from fastprune.trace.tracer import STRICT_ENV, TraceResult, TraceRuleError, trace_model

__all__ = ["RULES", "STRICT_ENV", "TraceResult", "TraceRuleError", "trace_model"]
