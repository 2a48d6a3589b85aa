"""Dead-letter stores: where tasks that will not run again are kept, listed, replayed and purged.

Durable brokers keep dead letters in the broker itself (``dead_letter.kind: broker``), so the
record is written in the same transaction that removes the task. A broker that is not durable
(memory) writes to a ``DeadLetterStore`` (``store``): ``MemoryDeadLetters`` (``memory``, lost with
the process), ``FileDeadLetters`` (``file``, JSON Lines that survive it, so ``dq-run dlq`` can list
and replay them later) or a ``module:Class`` store of one's own. The composition root
(runner.backends) picks one from the config.

Every store is thread-safe. Records come back in the order they were added.

May import: runner.errors, runner.model, runner.codec, runner.brokers.base.
"""
