"""The Ray Serve multi-adapter, OpenAI-compatible gateway and its engines. Imports inference/ and
core/ only; serve/finetuning/ (the fine-tuning API's control plane) also imports jobs/ and tune/
(.importlinter)."""
