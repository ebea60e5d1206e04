"""Pictures: grids, GIFs, plots and the forward-process figure."""
