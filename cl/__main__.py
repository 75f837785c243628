"""python -m cl [hydra overrides]"""
from cl.cli import main

if __name__ == "__main__":
    main()
