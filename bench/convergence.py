"""Runs ``python -m sven_ext bench convergence`` with this script's arguments (see ``--help``).

The harness lives in the package (sven_ext.harness) so it also runs from an installed wheel;
this script is the same command under bench/. Results go to the current directory unless
--out says otherwise.
"""

import os
import sys

if __name__ == "__main__":
    # Replace this process, so the command recorded with the results is the package's own.
    os.execv(sys.executable, [sys.executable, "-m", "sven_ext", "bench", "convergence", *sys.argv[1:]])
