"""Placeholder: the command is registered here when its issue lands."""
