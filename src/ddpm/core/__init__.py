"""The math of diffusion: beta schedules and the forward/reverse process, per term."""
