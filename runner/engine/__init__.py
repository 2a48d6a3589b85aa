"""The engine: one worker process's scheduling of tasks from one broker onto its threads.

``worker`` (lifecycle, per-type bookkeeping, dispatch, leases), ``attempt`` (one attempt of one
delivery: checks, the handler under its deadline, how it ends), ``settle`` (telling the broker
how a delivery ended, inline or in batches), ``timeouts`` (deadlines, interrupts, overruns) and
``retry`` (retry decisions).

May import: runner.errors, runner.model, runner.codec, runner.events, runner.eventlog and
runner.brokers.base (the contract, never a backend). Never the config models or pydantic: the
composition root (runner.app) hands the engine plain values.
"""
