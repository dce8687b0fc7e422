"""Converters from public VLM datasets to LLaVA jsonl records (`mmloom data convert`)."""

from __future__ import annotations

from mmloom.data.sources import llava, parquet, qa
from mmloom.data.sources.core import Context, SkipRecord, Source, Stats, run_convert
from mmloom.data.sources.llava import json_to_jsonl

# Registry: source name -> converter.
SOURCES: dict[str, Source] = {s.name: s for s in (*qa.SOURCES, *parquet.SOURCES, llava.SOURCE)}

__all__ = ["SOURCES", "Context", "SkipRecord", "Source", "Stats", "json_to_jsonl", "run_convert"]
