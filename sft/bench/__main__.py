"""`python -m sft.bench ...`: the throughput benchmark (sft/bench/driver.py)."""

import sys

from sft.bench.driver import main

sys.exit(main())
