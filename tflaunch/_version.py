"""The tflaunch version (its own module so setup.cfg can read it without importing tflaunch)."""

__version__ = "0.1.0"
