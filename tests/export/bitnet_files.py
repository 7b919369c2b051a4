"""Helpers that write .bitnet files with hand-made header changes (for the reader's error paths)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from bitnet_train.export.schema import metadata_crc32


def read_raw(path: Path) -> tuple[dict, bytes]:
    raw = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write_raw(path: Path, header: dict, data: bytes, fix_checksum: bool = True) -> Path:
    if fix_checksum:
        md = header["__metadata__"]
        ck = json.loads(md["checksums"])
        ck["metadata"] = metadata_crc32(md)
        md["checksums"] = json.dumps(ck)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * ((-(8 + len(head))) % 8)
    Path(path).write_bytes(struct.pack("<Q", len(head)) + head + data)
    return Path(path)


def mutate_meta(src: Path, dst: Path, key: str, fn, fix_checksum: bool = True, as_json: bool = False) -> Path:
    """Rewrite metadata[key] with fn(value) (the JSON-decoded value with as_json); None removes the key."""
    header, data = read_raw(src)
    md = header["__metadata__"]
    old = json.loads(md[key]) if as_json else md.get(key)
    new = fn(old)
    if new is None:
        md.pop(key, None)
    else:
        md[key] = json.dumps(new) if as_json else new
    return write_raw(dst, header, data, fix_checksum)
