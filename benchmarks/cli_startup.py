"""`amnesia --help` wall time, best of 5 (the target is under 1 s): the parser is built without torch.

python benchmarks/cli_startup.py
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path


def main() -> None:
    exe = shutil.which("amnesia") or str(Path(sys.executable).parent / "amnesia")
    times = []
    for _ in range(5):
        start = time.perf_counter()
        subprocess.run([exe, "--help"], check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    print(f"amnesia --help: best of 5 {min(times):.3f} s (all: {', '.join(f'{t:.3f}' for t in times)})")


if __name__ == "__main__":
    main()
