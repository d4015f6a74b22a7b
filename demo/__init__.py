"""The built-in demo model: a tiny Llama trained offline on Python's own help text (not part of the engine)."""
