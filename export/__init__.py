"""Packing, the .bitnet format and bitnet-export."""
