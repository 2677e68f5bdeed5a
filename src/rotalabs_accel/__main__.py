"""``python -m rotalabs_accel``: the command line (see :mod:`rotalabs_accel.cli`)."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
