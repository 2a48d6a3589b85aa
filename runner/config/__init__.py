"""Configuration: the one part that reads YAML and the environment.

A config file becomes a frozen, validated ``PipelineConfig`` in ``load``: YAML with the position
of every key (``document``), pydantic-settings sources in precedence order (CLI flags > DQ_*
environment > YAML > model defaults), the models (``models``, with ``numbers`` refusing booleans
where numbers are expected), the cross-field rules and handler imports (``rules``, reading
partly invalid input through ``inputs``; ``layout`` names mis-indented sections; ``kinds`` the
broker and dead-letter kinds, with the capability flags of the built-in brokers), and where
each value came from (``origins``, which also renders the effective config). ``schema`` is the
JSON Schema. Every problem is raised together in one ConfigError, located as ``file:LINE:COL``,
``env DQ_...`` or ``flag --...``.

May import: runner.errors and runner.loader (and pydantic). Only the composition root
(runner.app), runner.ops and runner.observe import this package.
"""
