"""The data subsystem: the Qwen2 tokenizer, document sources, the weighted mixture, packing into
training windows and the exactly resumable, data-parallel loader (see loader.py for the design)."""
