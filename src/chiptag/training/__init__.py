"""Training: the run (data -> model -> features -> phases -> loop -> summary), the epoch loop, resume, sweep."""
