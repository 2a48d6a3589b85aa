"""What acts around a task's life besides the handler: payload validation and fault simulation.

``payloads`` checks payloads against the pydantic model a handler declares; ``simulate`` injects
the faults the config's ``simulate`` section planned. runner.app wraps each handler with them.

May import: runner.errors, runner.model, runner.codec, runner.events and pydantic. Never the
config models: the composition root hands plain values.
"""
