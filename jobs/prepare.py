"""`python -m jobs.prepare CONFIG [key.sub=value ...]`: the data pipeline on its own.

The pipeline is jobs/data/prepare.py; this module only gives it the short command that sits beside
`python -m jobs.finetune`, so that users need not know the package's layout.
"""

from core import cli
from jobs.data.prepare import main

if __name__ == "__main__":
    cli.run(main)
