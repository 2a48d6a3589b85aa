"""What a person or a machine sees of a run: logs, metrics, the progress view and the summary.

``logs`` (one JSON or text line per engine event), ``metrics`` (Prometheus on ``/metrics``),
``progress`` (the live terminal view), ``summary`` (the end-of-run table) and ``tablefit``
(tables that fit a terminal). Each is an events.Listener attached by runner.app.

May import: runner.errors, runner.model, runner.codec, runner.events, runner.eventlog,
runner.config and runner.brokers.base. Never the engine or a backend.
"""
