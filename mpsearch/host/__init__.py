"""The machine and its files: host facts recorded with every measurement, cache paths, atomic writes."""
