"""Evaluation: long-context perplexity of a checkpoint (perplexity.py), its inputs (inputs.py), the report (report.py)."""


class EvalError(ValueError):
    """Bad evaluation input (checkpoint, data, context lengths); the message names the fix."""
