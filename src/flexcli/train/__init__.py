"""Training: the loop, elastic continued training, resumable checkpoints, torchrun/FSDP2, text corpora."""
