"""`python -m minillm ...`: the command line lives in minillm.cli."""
from .cli.main import main

if __name__ == "__main__":
    raise SystemExit(main())
