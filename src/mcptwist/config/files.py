# -*- test-case-name: tests.test_principal -*-
"""Files the configuration names that must stay private (secrets)."""

from __future__ import annotations

import os
import stat


def private_file_problem(path: str) -> tuple[str, str] | None:
    """What is wrong with a file that must be its owner's alone (0600 at
    most), and its fix; None when nothing is."""
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError as e:
        return f"cannot be read ({e.strerror})", "give an existing file the bridge may read"
    if mode & 0o077:
        return f"may be read by others (mode {mode:04o})", f"chmod 600 {path}"
    return None
