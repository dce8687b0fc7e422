"""Checkpoint interop: mmloom <-> transformers' Llava, the original LLaVA layout, HF component folders.

`mmloom.interop.formats.convert(src_format, dst_format, src, dst, **options)` converts;
`supported_pairs()` lists what converts to what.
"""
