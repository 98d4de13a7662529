"""Default configs (package data)."""
