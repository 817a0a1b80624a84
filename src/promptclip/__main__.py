"""`python -m promptclip`: the command line, as the `promptclip` script."""

from promptclip.cli import main

raise SystemExit(main())
