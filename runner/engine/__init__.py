"""The engine: one worker process's scheduling of tasks from one broker onto its threads.

``worker`` (the Worker: starts and stops the parts, runs the worker threads' loop), ``books``
(what the worker holds, per type, and who waits for what: one lock, no threads), ``dispatch``
(the dispatcher thread keeping the prefetch buffer filled), ``fetch`` (one broker call into
reserved room), ``leases`` (the lease keeper), ``attempt`` (one attempt of one delivery: checks,
middleware hooks, the handler under its deadline, how it ends), ``settle`` (telling the broker
how a delivery ended, inline or in batches), ``timeouts`` (deadlines, interrupts, overruns) and
``retry`` (retry decisions).

May import: runner.errors, runner.model, runner.codec, runner.events, runner.eventlog,
runner.middleware.base (the hooks it calls) and runner.brokers.base (the contract, never a
backend). Never the config models or pydantic: the composition root (runner.app) hands the
engine plain values.
"""
