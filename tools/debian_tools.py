"""Debian packages a benchmark or recording script runs, installed with apt-get on first use.

They are not in tools/setup: the test suite does not need them, and setup stays fast.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Mapping


def ensure(packages: Mapping[str, str], purpose: str) -> None:
    """``packages``: command -> the Debian package that provides it.  Installs what is missing,
    says so on stderr, and exits with a message if a command is still missing afterwards."""
    missing = sorted({pkg for tool, pkg in packages.items() if shutil.which(tool) is None})
    if not missing:
        return
    print(f"# installing {' '.join(missing)} (Debian packages {purpose})", file=sys.stderr,
          flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", *missing], env=env,
                   check=True, stdout=subprocess.DEVNULL)
    still = [t for t in packages if shutil.which(t) is None]
    if still:
        raise SystemExit(f"still missing after apt-get: {', '.join(still)}")
