"""Dataset records, manifest formats, image policy, buckets, multi-dataset mixing and the synthetic dataset."""

from editkit.data.manifest import FORMATS, parse_field_overrides, parse_manifest, read_manifest, write_manifest
from editkit.data.records import EditRecord

__all__ = ["EditRecord", "FORMATS", "parse_field_overrides", "parse_manifest", "read_manifest", "write_manifest"]
