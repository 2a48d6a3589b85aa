"""Brokers: the contract (``base``) and one backend per module or package.

``memory`` (in-process; its admin half in the sibling ``memory_admin``), ``sqlite/`` (one
durable file shared by the processes of one machine) and ``redis/`` (shared by processes on many
machines; its Lua scripts in ``.lua`` files). Backends are built by the composition root
(runner.app.create_broker), which imports each one lazily, so a memory pipeline never imports
redis. What a backend can do (durable, shared, settles in batches) is said by capability flags
on its class (``base``), never by its kind's name; a backend of one's own subclasses
``base.BaseBroker`` and is named by ``broker.kind: module:Class``.

May import: runner.errors, runner.model, runner.codec, runner.eventlog, runner.deadletter (the
memory broker keeps its dead letters in a store). Never the config models, pydantic or the
engine.
"""
