"""Training: the parallel model (pipeline chunks + data parallel), the step API and, on top, the
training program."""
