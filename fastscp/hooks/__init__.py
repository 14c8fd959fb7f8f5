"""Post-receive hooks: programs and built-in actions run after a store, an association's end or a quiet study.

Mechanism only: the post-store process (:mod:`fastscp.poststore.stage`)
tells :class:`~fastscp.hooks.runner.Hooks` what happened; the config's
``hooks`` list says what runs. Nothing here is on the C-STORE path.

- :mod:`fastscp.hooks.events`: what a hook is told (environment variables and
  a JSON document), and which hooks an event matches.
- :mod:`fastscp.hooks.runner`: runs them (no shell; timeout, concurrency
  limit, retries with backoff, process groups killed by PID), counts and logs.
- :mod:`fastscp.hooks.actions`: the built-in actions (full-size JPEG, copy, NIfTI volumes).
- :mod:`fastscp.hooks.link`: the supervisor's link to the post-store process
  (new hooks on SIGHUP one way, the hooks' counts for the status page the other).
"""
