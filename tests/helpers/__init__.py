"""Shared code for the tests (not collected): subprocess and data helpers, the serving fixtures, the
fake Shadeform API, and the scripts that torchrun starts. tests/ is on sys.path (pytest inserts the
directory of tests/conftest.py), so tests import them as `helpers.<module>`."""
