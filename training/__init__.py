"""Training of the small test checkpoint ``tests/checkpoints/commands-en`` (a dev tool).

Run it through ``script/train-test-model``; nothing here is imported by the server.
"""
