"""Speculative decoding: proposers (ngram.py: prompt lookup; draft.py: a smaller model) and the verification rule (verify.py)."""
