"""The tensor table of a safetensors file, read from its header alone, with a clear error for a
truncated or corrupt file. Shared by the plugin's checkpoint check at engine start and the converter.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path


class SafetensorsHeaderError(ValueError):
    """A safetensors file that cannot be what it claims: the message names the file and the problem."""


def read_safetensors_header(path: Path) -> dict[str, dict]:
    """{tensor name: {"dtype", "shape" (ints), "data_offsets"}} of ``path`` (``__metadata__`` dropped)."""
    size = path.stat().st_size
    damaged = "the file is truncated or corrupt"
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise SafetensorsHeaderError(f"{path}: {size} bytes, too short for a safetensors file; {damaged}")
        (hlen,) = struct.unpack("<Q", head)
        if hlen > size - 8:
            raise SafetensorsHeaderError(f"{path}: header length {hlen} exceeds the file size {size}; {damaged}")
        try:
            header = json.loads(f.read(hlen))
            tensors = {k: v for k, v in header.items() if k != "__metadata__"}
            end = max((int(v["data_offsets"][1]) for v in tensors.values()), default=0)
            for v in tensors.values():
                v["shape"] = [int(d) for d in v["shape"]]
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
            raise SafetensorsHeaderError(f"{path}: corrupt safetensors header ({e!r}); {damaged}") from e
    if 8 + hlen + end > size:
        raise SafetensorsHeaderError(
            f"{path}: {damaged}: its header describes {8 + hlen + end} bytes but the file has {size}")
    return tensors
