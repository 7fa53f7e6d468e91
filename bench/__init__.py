"""Benchmarks of jobwire beside its peers (run with `make bench`)."""
