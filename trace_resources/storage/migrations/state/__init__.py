"""Revisions of Postgres state (the version store and the query service's tables)."""
