"""Files copied into saved checkpoints (see :mod:`fastprune.io`)."""
