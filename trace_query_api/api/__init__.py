"""The HTTP API: dependencies (`deps.py`) and routes (`routes/`)."""
