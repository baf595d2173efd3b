"""The training recipe: config, batches, optimizer, schedule, checkpoints, feature cache, loop."""
