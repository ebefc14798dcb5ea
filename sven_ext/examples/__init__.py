"""Worked problems for Sven; each module runs as a script (``python -m sven_ext.examples.<name>``)."""
