"""The `mmloom` command line."""
