"""What a person runs: the ``dq-run`` command line and what stands behind each command.

``cli`` (arguments to calls, errors to exit codes), ``service`` (``dq-run run``: one worker
process with its signals), ``admin`` and ``views`` (``publish``, ``dlq``, ``stats`` and how they
print), ``drafts`` (checking publish input), ``produce`` (the demo producer), ``bench``
(``dq-run bench``) and ``leftover`` (what a stop leaves behind, in words).

May import anything in runner; nothing in runner imports ops (except ``runner.__main__``).
"""
