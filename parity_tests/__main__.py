"""python -m parity_tests --artifacts DIR: the parity ledger (parity_tests/ledger.py)."""

import sys

from parity_tests.ledger import main

if __name__ == "__main__":
    sys.exit(main())
