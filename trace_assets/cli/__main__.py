"""`python -m trace_assets.cli`: the `trace` command."""

from trace_assets.cli import main

raise SystemExit(main())
