"""Run configs. `base.py` is the schema: every key, its default and one line of documentation."""
