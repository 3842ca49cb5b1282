"""Generation: the KV-cache decoder and sampling (generate.py), the `deepseekmoe generate`
command and the model loading it shares with `deepseekmoe chat` (cli.py, chat.py)."""
