"""Data shipped with the package (see README.md here for source and license)."""

from pathlib import Path

DOLLY_SAMPLE = Path(__file__).with_name("dolly_sample.jsonl")
"""400 Dolly-15k records, 50 per category (CC BY-SA 3.0, Databricks, Inc.)."""
