"""Projection benchmark; same as `lipschitz bench projections`. See lipschitz/bench.py."""

from lipschitz.bench import main

if __name__ == "__main__":
    main()
