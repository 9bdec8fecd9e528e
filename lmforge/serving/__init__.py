"""``lmforge serve`` in parts, each testable alone (``lmforge.serve`` names them and is the front door)."""
