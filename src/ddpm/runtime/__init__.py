"""Where the arithmetic runs: devices, precision, processes."""
