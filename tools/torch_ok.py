"""Exit 0 when a torch >= 2.3 is importable (the user's own build is kept)."""

import sys

try:
    import torch
except ImportError:
    sys.exit(1)
major, minor = (int(part) for part in torch.__version__.split("+")[0].split(".")[:2])
sys.exit(0 if (major, minor) >= (2, 3) else 1)
