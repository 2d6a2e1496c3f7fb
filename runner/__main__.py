"""`python -m twinflow.runner` = the `twinflow` command."""
from .cli import main

raise SystemExit(main())
