"""`python -m minillm`: argument parsing, dispatch and printing (nothing else does any of it).

- `main.py`: the subcommands (`generate`, `chat`, `bench`, `eval`, `serve`, `quantize`, `train`, `info`).
"""
