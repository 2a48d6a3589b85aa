"""Helpers for config tests."""

from __future__ import annotations

from runner.config.models import PipelineConfig


def as_run(config: PipelineConfig) -> PipelineConfig:
    """``config`` with every computed or capped value replaced by the one in force.

    ``dq-run config`` prints values in force (``prefetch: 48  # computed: 16 x workers``), so
    its output loads back to a config that runs the same, not to an equal model.
    """
    task_types = {
        name: task_type.model_copy(update={"concurrency": config.concurrency_for(name)})
        for name, task_type in config.task_types.items()
    }
    return config.model_copy(
        update={"prefetch": config.effective_prefetch(), "task_types": task_types}
    )
