"""Inference: interactive chat, batched generation over question files, and answer scoring."""
