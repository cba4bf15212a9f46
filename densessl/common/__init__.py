"""What every layer uses: errors, checkpoint I/O, distributed helpers, schedules, EMA, the method
registry, metrics.jsonl reading and the machine description. Imports nothing else of densessl."""
