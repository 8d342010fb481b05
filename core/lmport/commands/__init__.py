"""One module per ``lmport`` sub-command; each has ``add_parser(subparsers)``."""
