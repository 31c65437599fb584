"""Stage abstraction, driver, config and the stage registry."""
