"""python -m parity_tests --artifacts DIR: the parity ledger (parity_tests/ledger.py)."""

from export.core.cli import run_cli
from parity_tests.ledger import main

if __name__ == "__main__":
    run_cli(main)
