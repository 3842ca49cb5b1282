"""Everything written to or read from disk about a model or a run.

    files.py     crash-safe output (temporary name, fsync, rename) and the pruning of old outputs
    native.py    the project's native model directory (config.json + model.safetensors)
    hf.py        the released deepseek-moe Hugging Face format (config.json <-> ModelConfig,
                 tensor plan, streaming safetensors read and write)
    training.py  single-process training checkpoints (verified manifest, RNG states, resume)
    dcp.py       sharded checkpoints of distributed runs (torch.distributed.checkpoint)
    convert.py   the `deepseekmoe convert` command

Submodules are imported on use: the data and training code only need `files`.
"""
