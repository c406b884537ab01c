"""The stages in sequence: `edgeft run` (a recipe: every stage from one YAML file) and `edgeft demo` (the main
job on the embedded default). The fleet, distributed and service capabilities land beside these."""
