"""The VMware-side agent (VMA): source exports, the copy engine, progress.

Nothing in this package imports Django, so it runs and tests on its own."""

# The agent software's version: the OMA reads it from the change feed
# (Agents page, `manage.py agent list`).
__version__ = "0.30.0"
