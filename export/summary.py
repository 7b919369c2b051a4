"""What `bitnet-export` reports after writing: parameters, bits/weight, size vs fp16, scale ranges."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .model_tensors import ModelTensors, ternary_names
from .schema import linear_shapes


@dataclass
class ExportSummary:
    output: str
    format: str
    packing: str
    dense_dtype: str
    parameters: int
    ternary_parameters: int
    ternary_bytes: int  # bytes holding ternary codes in the output, padding included
    file_bytes: int
    scales: dict[str, float]  # ternary linear -> s_w
    fallbacks: dict[str, str] = field(default_factory=dict)  # tensor -> type used instead (GGUF)
    notes: list[str] = field(default_factory=list)

    @property
    def ternary_bits_per_weight(self) -> float:
        return 8.0 * self.ternary_bytes / self.ternary_parameters if self.ternary_parameters else 0.0

    @property
    def file_bits_per_parameter(self) -> float:
        return 8.0 * self.file_bytes / self.parameters

    @property
    def fp16_bytes(self) -> int:
        return 2 * self.parameters

    def scale_groups(self) -> dict[str, tuple[float, float, int]]:
        """Projection kind (layers.*.self_attn.q_proj, ...) -> (min s_w, max s_w, count)."""
        groups: dict[str, list[float]] = {}
        for name, s in self.scales.items():
            groups.setdefault(re.sub(r"^layers\.\d+\.", "layers.*.", name), []).append(s)
        return {k: (min(v), max(v), len(v)) for k, v in groups.items()}

    def to_dict(self) -> dict:
        return {
            "output": self.output, "format": self.format, "packing": self.packing, "dense_dtype": self.dense_dtype,
            "parameters": self.parameters, "ternary_parameters": self.ternary_parameters,
            "ternary_bits_per_weight": round(self.ternary_bits_per_weight, 4),
            "file_bytes": self.file_bytes, "fp16_bytes": self.fp16_bytes,
            "file_bits_per_parameter": round(self.file_bits_per_parameter, 4),
            "scales": {k: {"min": lo, "max": hi, "count": n} for k, (lo, hi, n) in self.scale_groups().items()},
            "fallbacks": self.fallbacks, "notes": self.notes,
        }


def make_summary(arrays: ModelTensors, output: Path, fmt: str, packing: str, dense_dtype: str, ternary_bytes: int,
                 fallbacks: dict[str, str] | None = None, notes: list[str] | None = None) -> ExportSummary:
    """After the write: `arrays` has produced every ternary linear, so its scales are known."""
    file_bytes = sum(p.stat().st_size for p in output.rglob("*") if p.is_file()) if output.is_dir() else output.stat().st_size
    ternary = ternary_names(arrays)
    shapes = linear_shapes(arrays.config)
    return ExportSummary(
        output=str(output), format=fmt, packing=packing, dense_dtype=dense_dtype,
        parameters=arrays.num_parameters(),
        ternary_parameters=sum(int(np.prod(shapes[n])) for n in ternary),
        ternary_bytes=ternary_bytes, file_bytes=file_bytes,
        scales={n: arrays.scale(n) for n in ternary},
        fallbacks=dict(fallbacks or {}), notes=list(notes or []),
    )


def _size(n: int) -> str:
    if n <= 0:
        return "0 B"
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    i = min(int(math.log(n, 1024)), len(units) - 1)
    return f"{n / 1024 ** i:.2f} {units[i]}" if i else f"{n} B"


def print_summary(s: ExportSummary, console) -> None:
    from rich.table import Table

    console.print(f"[bold]wrote[/bold] {s.output}  ({s.format}, packing {s.packing}, dense {s.dense_dtype})")
    console.print(f"  parameters       {s.parameters:,} ({s.ternary_parameters:,} ternary, "
                  f"{s.parameters - s.ternary_parameters:,} dense)")
    console.print(f"  bits/weight      {s.ternary_bits_per_weight:.3f} (ternary weights, padding included); "
                  f"{s.file_bits_per_parameter:.3f} over the whole file")
    console.print(f"  file size        {_size(s.file_bytes)} = {s.file_bytes / s.fp16_bytes:.1%} of fp16 "
                  f"({_size(s.fp16_bytes)})")
    if s.scales:
        t = Table(title="weight scales s_w (multiply convention)", title_justify="left")
        for col in ("tensor", "count", "min", "max"):
            t.add_column(col, justify="left" if col == "tensor" else "right")
        for name, (lo, hi, n) in s.scale_groups().items():
            t.add_row(name, str(n), f"{lo:.4g}", f"{hi:.4g}")
        console.print(t)
    if s.fallbacks:
        console.print(f"  [yellow]not ternary in this format[/yellow] ({len(s.fallbacks)} tensors):")
        for name, why in s.fallbacks.items():
            console.print(f"    {name}: {why}")
    for note in s.notes:
        console.print(f"  note: {note}")
