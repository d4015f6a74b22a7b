"""Speculative decoding: proposers (ngram now; a draft model later) and the verification rule (verify.py)."""
