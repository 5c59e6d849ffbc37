"""`python -m jobs.prepare CONFIG [key.sub=value ...]`: the data pipeline on its own (jobs/data/prepare.py)."""

from jobs.data.prepare import app

if __name__ == "__main__":
    app()
