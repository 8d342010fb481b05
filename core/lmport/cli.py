"""The ``lmport`` command line."""

def main(argv=None) -> int:
    raise SystemExit("not yet")


def launcher_main(argv=None) -> int:
    raise SystemExit("not yet")
