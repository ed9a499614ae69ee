"""Executes scheduler plans on the model (see ModelRunner)."""
