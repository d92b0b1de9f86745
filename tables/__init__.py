"""Table definitions and state operators of the pipeline."""
