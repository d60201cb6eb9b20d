from mpsearch.cli import entry

entry()
