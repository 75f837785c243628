"""A Hydra sweeper that launches an explicit list of jobs (`cl.bench`'s tuning and evaluation runs)."""
