"""Training: the loop, its log, and the process group."""
