"""The end-to-end demo: a synthetic shapes dataset and the pipeline that learns it."""
