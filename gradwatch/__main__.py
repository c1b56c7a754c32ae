"""``python -m gradwatch``: the ``gradwatch`` command (see `gradwatch._report.cli`)."""

import sys

from gradwatch._report.cli import main

if __name__ == "__main__":
    sys.exit(main())
