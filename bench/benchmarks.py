"""`python -m bench.benchmarks ...`: the documented spelling of `python -m bench.profile.benchmarks`."""
from bench.profile.benchmarks import _main as main

if __name__ == "__main__":
    raise SystemExit(main())
