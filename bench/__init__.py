"""Measurements of the OMA and the agent. Run each from the project root as a
module, e.g. `.venv/bin/python -m bench.copy_bench --help`; common.py is what
they share."""
