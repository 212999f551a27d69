"""Test support for every tier: paths, tiny models, tokenizers and configs, Ray node helpers.

`pyproject.toml` puts `tests/` on sys.path (`pythonpath`), so tests import `support.<module>`.
"""
