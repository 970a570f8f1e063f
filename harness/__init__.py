"""dlcompare's harness: runs backends in subprocesses, compares them with the NumPy oracle, writes results.

Importing it pulls in no deep-learning framework (a test checks this)."""
