"""cl: continual-learning experiments. The engine knows no dataset and no method;
scenarios and strategies plug in through `cl.stream` and `cl.strategy`."""

__version__ = "0.1.0"
