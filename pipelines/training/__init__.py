"""Training: sequence assembly and the Lightning trainer."""
