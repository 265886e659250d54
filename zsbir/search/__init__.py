"""Sketch search: a run's photo index (FAISS), the search command and the web app (docs/search.md)."""
