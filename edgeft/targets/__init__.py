"""Target devices over SSH: probe, bench and train on the edge box itself, with only what it needs (targets/*.py)."""
