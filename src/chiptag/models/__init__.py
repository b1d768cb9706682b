"""Models: the backbone registry, the head, self-describing checkpoints and what fine-tuning unfreezes."""
