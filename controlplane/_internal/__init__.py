"""Helpers that are not domain code: one of each primitive, used by every domain package.

* ``fs``: atomic and write-new files (the only place that writes a file in place safely).
* ``tools``: the runner for external tools (argv only, a deadline, process-group kill,
  classified errors).
* ``netns``: ``ip``, ``nft``, ``lsns`` and ``kill`` wrapped once, through a transport.

Nothing here is public API; import from the domain packages instead.
"""
