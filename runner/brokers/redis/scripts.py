"""The Redis broker's data model, and its Lua scripts (kept in .lua files beside this module).

Data model (every key starts with ``{namespace}:``, a hash tag, so all keys of one namespace live
in one Redis Cluster slot and a script may touch any of them):

- ``q:<type>``   stream of ready and leased tasks, one consumer group ``GROUP``. Entry fields:
  ``a`` = hand-outs before this entry (attempts already used), ``t`` = the JSON envelope.
  A task's attempt at hand-out is ``a`` + the entry's delivery count, which Redis keeps in the
  pending entries list (XREADGROUP sets it to 1, XAUTOCLAIM adds 1, ``XCLAIM JUSTID`` does not).
  A delivery count of 2 or more means a lease of the entry expired: it is handed out as
  *redelivered*. A released entry stays where it is, pending for the consumer ``RELEASED``
  with its delivery count lowered by one, so it is handed out again before newer entries, with
  the same attempt and redelivered flag (as on the other brokers).
- ``d:<type>``   sorted set of delayed tasks scored by not_before; member ``"<nonce> <a> <t>"``
  (the nonce keeps two equal envelopes apart).
- ``leases``     hash ``"<entry id>@<stream key>"`` -> lease token of the current delivery. Every
  ack / retry / dead / release / extend checks the token first: XACK alone does not check who
  owns an entry, so this is what fences a worker whose delivery was reclaimed.
- ``settled:<ms>:0`` / ``settled:<ms>:1``  sets of the lease tokens settled recently by brokers
  whose visibility timeout is ``<ms>`` milliseconds, so that a settle or renewal under a token
  that already settled answers *already done*, not *fenced* (a resent call whose reply was
  lost, a renewal racing the settle). Redis' clock cuts time into buckets one visibility
  timeout wide; bucket ``b`` writes the set of parity ``b % 2``, which holds the member
  ``#<b>``: a settle finding another bucket's mark there empties the set first. A set expires
  at the end of bucket ``b + 1``, so a token is remembered for one to two visibility timeouts,
  and the two sets hold at most two buckets' settles (at 10,000 settles/s and a 30 s visibility
  timeout, about 0.6 million tokens, roughly 50 MB). Tokens are unique (a random nonce per
  broker), so any token found in either set did settle. Only the broker that settled a token
  sends it again, so brokers of one namespace with different visibility timeouts keep
  separate sets.
- ``count``      the capacity counter: tasks from put until ack or dead (XLEN cannot serve, as it
  would count what another consumer has read, and a stream is never trimmed below its unacked
  entries; acked entries are XDEL-ed instead).
- ``types``      set of every type ever put (for depth and the operator commands).
- ``held``       hash task id -> how many copies of it are queued (ready, delayed or leased),
  from put (PUT, a settle's effect put, REPLAY) until ack, dead or ``cancel``; a settle's
  effect put of a held id is skipped. It costs one HINCRBY per put (one HSETNX per effect put,
  which is also its check), one HINCRBY and one HDEL per ack or dead, and a field per queued
  task (roughly 100 bytes with a 32-character id).
  A task queued before the index existed is not in it: its effect put is not skipped, and its
  ack deletes the field at -1 that its HINCRBY made.
- ``gates``      hash type name -> the type's pause: ``''`` until cleared, else the end as
  epoch seconds on Redis' clock (``repr`` of the float, so it reads back exactly). POLL reads
  the wanted types' fields and hands out nothing of a type whose pause is in force (by TIME,
  inside the script); it deletes a pause it finds over.
- ``rates``      hash type name -> the type's rate limit, ``"<rate> <burst>"`` (``repr`` of each
  float). Set and cleared by the operator calls; POLL reads the wanted types' fields.
- ``buckets``    hash type name -> the token bucket of a rate-limited type,
  ``"<tokens> <at> <limited_s>"`` (``%.17g`` of each, so they read back exactly; ``at`` on
  Redis' clock). Written by POLL only (bucket.lua, the arithmetic of runner/brokers/flow.py):
  refilled to TIME, then one token taken per task handed out. A type without a field has a
  full bucket; clearing the rate deletes the field, setting a new one keeps it.
- ``breakers``   hash type name -> the type's circuit breaker, ``"<failure_rate> <min_calls>
  <window_s> <open_for_s> <half_open_calls>"`` (``repr`` of the floats). Set and cleared by the
  operator calls; POLL reads the wanted types' fields, SETTLE the fields of the types whose
  outcomes it records.
- ``circuits``   hash type name -> the circuit of a type with a breaker, ``"<state> <since>
  <window_start> <calls> <failures> <prev_calls> <prev_failures> <probes>"`` (runner.brokers.base
  .Circuit's fields; ``%.17g`` of the two times, on Redis' clock). Written by POLL (the circuit
  moved on to TIME, then the probes handed out, stored when that changed it) and by SETTLE (an
  outcome an op that answered done carries, recorded at TIME), both by circuit.lua, the steps of
  runner/brokers/flow.py. A type without a field has a new, closed circuit; clearing the
  breaker deletes the field, setting it again keeps it.
- ``v:<key>``    a value set by a settle's effects (``SET``, with ``PX`` for a ttl, so Redis
  expires it by its own clock) or by ``put_if`` (no ttl); read by ``read_values`` and
  ``scan_values`` (SCAN), deleted by ``delete_values``. ``v:unique:<key>`` holds the id of the
  task put with that unique key: SET (no ttl) by ``put_unique``, then given its ttl or deleted
  by the effects of the task's settle. A join's kept parts are a hash at its value key (part
  index -> JSON text), written by SETTLE's ``part`` effects and deleted when the join fires
  or by ``delete_values`` (MGET, hence ``read_values`` and ``scan_values``, reads it as absent).
- ``dlq`` / ``dlq:idx``  hash task id -> dead-letter JSON, and a sorted set by dead_at.
- ``wake:<consumer>``  one broker's wake stream (one entry, expiring): ``wake()`` adds to it to
  end that broker's blocked XREAD (runner/brokers/redis/broker.py), never read by a script.
"""

from __future__ import annotations

from pathlib import Path


def _lua(name: str) -> str:
    """The text of ``name``.lua, beside this module (shipped as package data)."""
    return Path(__file__).with_name(f"{name}.lua").read_text(encoding="utf-8")


#: The one consumer group of every stream.
GROUP = "dq"
#: The consumer that released entries are pending for until a poll hands them out again (no
#: real consumer has this name: theirs are "host:pid:random"). Spelled out in the scripts.
RELEASED = "~released"

# Shared helpers, prepended to the scripts that need them.
_ENSURE_GROUP = _lua("ensure_group")

# The memory of settled tokens (the ``settled:<ms>:*`` sets of the module docstring).
_WAS_SETTLED = _lua("was_settled")

# TIME is Redis' clock; a script may write after it, as scripts replicate their effects (the
# only mode Redis 7 has).
_REMEMBER = _lua("remember")
_CLOCK = _lua("clock")

# The ``held`` index of the module docstring.
_HELD = _lua("held")

# put.lua (KEYS, ARGV and the reply are described there).
_PUT_FN = _ENSURE_GROUP + _HELD + _lua("put")
PUT = _PUT_FN + "return put(KEYS, ARGV)\n"

# put_if.lua (KEYS, ARGV and the reply are described there): PUT behind a compare-and-set.
PUT_IF = _PUT_FN + _lua("put_if")

# put_unique.lua (KEYS, ARGV and the reply are described there): PUT of the tasks whose unique
# key is free, holding their keys.
PUT_UNIQUE = _PUT_FN + _lua("put_unique")

# The token bucket of a rate limit, as runner/brokers/flow.py computes it (for POLL).
_BUCKET = _lua("bucket")

# The state machine of a circuit breaker, as runner/brokers/flow.py runs it (for POLL and
# SETTLE; EXCHANGE has both, and the helpers once).
_CIRCUIT = _CLOCK + _lua("circuit")

# poll.lua (KEYS, ARGV and the reply are described there).
_POLL_FN = _lua("poll")
POLL = _ENSURE_GROUP + _BUCKET + _CIRCUIT + _POLL_FN + "return poll(KEYS, ARGV)\n"

#: The payload a join's task is encoded with for SETTLE, which splices the parts' JSON array in
#: its place (JSON text is spliced, not decoded and encoded again, so every part reads back as
#: its sender wrote it). Plain JSON (no escapes), found as the top-level ``"payload":"..."``,
#: which no JSON string can hold unescaped.
JOIN_PAYLOAD = "dq:join parts"
_JOINED = f'local JOINED = \'"payload":"{JOIN_PAYLOAD}"\'\n'

# settle.lua (KEYS, ARGV and the reply are described there).
_SETTLE_HEAD = _ENSURE_GROUP + _HELD + _WAS_SETTLED + _REMEMBER + _CIRCUIT + _JOINED
_SETTLE_FN = _lua("settle")
SETTLE = _SETTLE_HEAD + _SETTLE_FN + "return settle(KEYS, ARGV)\n"

# exchange.lua (KEYS, ARGV and the reply are described there).
EXCHANGE = _SETTLE_HEAD + _BUCKET + _SETTLE_FN + _POLL_FN + _lua("exchange")

# extend.lua (KEYS, ARGV and the reply are described there).
EXTEND = _WAS_SETTLED + _lua("extend")

# replay.lua (KEYS, ARGV and the reply are described there).
REPLAY = _ENSURE_GROUP + _HELD + _lua("replay")

# queued.lua and cancel.lua (KEYS, ARGV and the replies are described there): the pipeline
# admin's reading of one type's queued tasks, and its dead-lettering of the waiting ones.
QUEUED = _lua("queued")
CANCEL = _HELD + _lua("cancel")

# depth.lua (KEYS, ARGV and the reply are described there).
DEPTH = _lua("depth")
