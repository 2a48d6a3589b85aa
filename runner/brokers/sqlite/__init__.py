"""The SQLite broker: a durable queue in one file, shared by the processes of one machine.

``broker`` (SqliteBroker), ``admin`` (its operator commands, gate and value calls),
``schema`` (the file: schema, connection settings, error translation, row helpers), ``gates``
(the rows of pauses, rate limits and circuit breakers, read by every claim), ``batch``
(group commit of many threads' writes), ``joins`` (pipelines' joins, and the rows of a
pipeline's ``tasks_of`` and ``cancel``) and ``checkpoint`` (WAL checkpoints off the commit
path).
"""
