#!/usr/bin/env python
"""Django's command-line utility for the demo site (settings: testproject.settings)."""

import os
import sys
from pathlib import Path


def main() -> None:
    # sys.path[0] is this directory (the testproject and shop packages); the repository root goes
    # last, so django_pooled_pg imports even where it is not installed.
    root = str(Path(__file__).resolve().parent.parent)
    if root not in sys.path:
        sys.path.append(root)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "testproject.settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)


if __name__ == "__main__":
    main()
