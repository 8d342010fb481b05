"""Moved to :mod:`lmport.executor` (kept so that old imports work)."""

from lmport.executor import ExecutorOutput, ModelExecutor, PendingStep, PromptLogprobs, SampledToken  # noqa: F401
