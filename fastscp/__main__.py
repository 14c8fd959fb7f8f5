"""``python -m fastscp``: the ``fastscp`` command."""

from fastscp.cli.main import main

raise SystemExit(main())
