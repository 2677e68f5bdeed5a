"""Op layer: autograd and torch.library registration around the Triton launchers; nothing else."""
