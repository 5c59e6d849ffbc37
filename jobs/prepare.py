"""`python -m jobs.prepare CONFIG [key.sub=value ...]`: the data pipeline on its own (jobs/data/prepare.py)."""

from jobs import cli
from jobs.data.prepare import main

if __name__ == "__main__":
    cli.run(main)
