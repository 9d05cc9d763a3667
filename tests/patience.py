"""How long a test waits for a condition (a server answering, a page showing a reply) before it fails.

Generous on purpose: tests run on busy 2-core machines, and a wait is never a measure of speed.
"""
PATIENCE = 600  # seconds
