"""Faults, load and hostile input: crashes, database trouble, limits, access control, fuzzing."""
