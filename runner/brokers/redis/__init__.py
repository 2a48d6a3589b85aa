"""The Redis broker: one stream per task type, shared by processes on many machines.

``broker`` (RedisBroker: calls, reconnects, wake-ups), ``admin`` (the operator commands) and
``scripts`` (the data model, and the Lua scripts, kept in ``.lua`` files beside it and loaded at
import).
"""
