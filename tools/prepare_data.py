"""Lay out this workplace's shared datasets as normlab's loaders expect them.

    python tools/prepare_data.py SHARED_DATA DEST

links SHARED_DATA/mnist into DEST/mnist and writes DEST/cifar-10-batches-py
with the shared copy's materialize.py (idempotent, about 10 s the first time).
"""

import subprocess
import sys
from pathlib import Path


def prepare(shared: Path, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    mnist = dest / "mnist"
    if not mnist.exists() and (shared / "mnist").is_dir():
        mnist.symlink_to((shared / "mnist").resolve(), target_is_directory=True)
    materialize = shared / "cifar10" / "materialize.py"
    if not (dest / "cifar-10-batches-py" / "test_batch").exists() and materialize.exists():
        subprocess.run([sys.executable, str(materialize), str(dest)], check=True)
    return dest


if __name__ == "__main__":
    prepare(Path(sys.argv[1]), Path(sys.argv[2]))
