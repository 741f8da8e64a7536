"""Glue for third-party packages that ship a database ENGINE of their own."""
