"""What a checkpoint directory holds, subfolders included (the PEFT files may sit in ``peft_lora/``)."""

from __future__ import annotations

from pathlib import Path


def file_tree(directory: Path) -> set[str]:
    """Every file under ``directory`` as a '/'-separated path relative to it."""
    return {p.relative_to(directory).as_posix() for p in Path(directory).rglob("*") if p.is_file()}
