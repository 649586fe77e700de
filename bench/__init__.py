"""peft-ops microbenchmarks: ``python -m bench --help``."""
