"""The engine: one worker process's scheduling of tasks from one broker onto its threads (and
an event loop, for async types).

``worker`` (the Worker: starts and stops the parts, runs the worker threads' loop), ``books``
(what the worker holds, per type, and who waits for what: one lock, no threads), ``dispatch``
(the dispatcher thread keeping the prefetch buffer filled), ``fetch`` (one broker call into
reserved room), ``leases`` (the lease keeper), ``attempt`` (one attempt of one delivery: checks,
middleware hooks, the handler under its deadline, how it ends), ``settle`` (telling the broker
how a delivery ended, inline or in batches), ``timeouts`` (deadlines, interrupts, overruns),
``retry`` (retry decisions), ``aio`` (the AsyncWorker: async types' coroutines on an event loop),
``handoff`` (pipeline hand-offs as settle effects), ``cancels`` (cancelled pipelines seen by
running tasks), ``schedule``, ``circuits``, ``presence`` and ``periodic`` (the background loops
beside the worker).

One word per concept: to **settle** a delivery is the broker call that ends it (ack, retry, dead
or release), and every name for it says so: a ``Settle`` (runner.brokers.base) is one such call's
arguments, ``settle_one`` / ``Broker.settle_many`` make one or several, the ``Settler`` makes
them for the worker. Two neighbouring concepts keep their own words: a retry policy's
``Decision`` (retry, or dead-letter and why) is what picks a settle's kind, and an attempt's
``Outcome`` is the settle it ended in together with the event that is emitted once the broker
answered it.

May import: runner.errors, runner.model, runner.codec, runner.events, runner.eventlog,
runner.middleware.base (the hooks it calls) and runner.brokers.base (the contract, never a
backend). Never the config models or pydantic: the composition root (runner.app) hands the
engine plain values.
"""
