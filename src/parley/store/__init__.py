"""Persistence: SQLAlchemy models, queries, the event log and migrations."""
