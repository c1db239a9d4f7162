"""qwen2-launch: run the trainer locally, under torchrun on one or many nodes, or on SLURM."""
