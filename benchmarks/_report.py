"""What every benchmark report says about where it ran, and how it is published."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def machine() -> str:
    import torch

    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{cpu}; {os.cpu_count()} logical cores; {platform.system()}; torch {torch.__version__} with "
        f"{torch.get_num_threads()} threads; Python {platform.python_version()}"
    )


def publish(lines: list[str], *, title: str, script: str, filename: str | None) -> None:
    """Print the report; with ``filename``, also write it to ``benchmarks/filename``."""
    report = "\n".join(lines)
    print(report)
    if filename:
        header = f"# {title}\n\nProduced by `python benchmarks/{script} --write`.\n\n"
        (Path(__file__).parent / filename).write_text(header + report + "\n")
