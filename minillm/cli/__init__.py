"""`python -m minillm`: argument parsing, dispatch and printing (nothing else does any of it).

- `train.py`: `python -m minillm train` (the flags and printing around minillm.model.train);
- `main.py`: the subcommands (`generate`, `chat`, `bench`, `eval`, `serve`, `quantize`, `train`, `info`).
"""
