"""The VMware-side agent (VMA): source exports, the copy engine, progress.

Nothing in this package imports Django, so it runs and tests on its own."""
