"""Run several `sparsevl train` commands one after another in the same processes (one torchrun launch, so
the tests pay the start-up of two processes once): `torchrun --nproc_per_node 2 fsdp_driver.py RUNS.json`,
where RUNS.json is a list of flag lists. Exits with the first non-zero status."""

import json
import sys

from sparsevl.cli import main

if __name__ == "__main__":
    for flags in json.loads(open(sys.argv[1]).read()):
        status = main(["train", *flags])
        if status:
            sys.exit(status)
