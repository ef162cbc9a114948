"""`python -m analyzer.cli`: the `nwcap` command."""

from analyzer.cli.main import main

raise SystemExit(main())
