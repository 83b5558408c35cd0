"""One module per anomaly model; each registers its named configurations with `competition.zoo.registry`,
which imports every module here (see the package docstring of `competition.zoo` for adding one)."""
