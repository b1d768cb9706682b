"""Run directories: their layout (every file name, in one place) and the experiments table."""
