"""``python -m polyak``: the command line."""

from polyak.cli import main

raise SystemExit(main())
