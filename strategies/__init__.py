"""Methods, one module each, on the hooks of `cl.strategy.Strategy`."""
