"""Contracts every part shares: the trajectory message (versioned), the SQL tables and their migrations.

Nothing here imports torch or a model: producers, consumers and the trainer agree on these shapes alone.
"""
