class CheckpointError(ValueError):
    """A model directory or checkpoint file that cannot be used; the message names the file."""
