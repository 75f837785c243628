"""Scenario builders: a dataset in, a `cl.stream.Stream` out."""
