"""Revisions of Postgres data (the alert pipeline's tables)."""
