"""``python -m orchestrator``: the ``structure-sweep`` command without its script
(e.g. as a Ray job entrypoint). ``orchestrator/__init__.py`` has already set
Ray's environment by the time this runs."""

import sys

from orchestrator.cli import main

sys.exit(main())
