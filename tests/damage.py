"""Damaging a checkpoint as a bad write does, for the recovery tests."""

import os


def damage_checkpoint(step_dir: str) -> str:
    """Damages the largest array file of a checkpoint's state: its first bytes flipped and its second half lost.
    (Bits flipped only inside an array's stored bytes can go unnoticed: tensorstore keeps incompressible float
    chunks as raw zstd blocks, which carry no checksum.) Returns the file's path."""
    files = [os.path.join(d, n) for d, _, names in os.walk(os.path.join(step_dir, "state")) for n in names]
    target = max(files, key=os.path.getsize)
    size = os.path.getsize(target)
    with open(target, "r+b") as f:
        head = bytearray(f.read(64))
        f.seek(0)
        f.write(bytes(b ^ 0xFF for b in head))
        f.truncate(size // 2)
    return target
