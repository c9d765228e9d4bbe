"""One file per method, each written against the backend seam (multisal.backend)."""
