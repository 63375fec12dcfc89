"""Projection benchmark (`lipschitz bench projections`): lipschitz/bench_projections.py."""

from lipschitz.bench_projections import main

if __name__ == "__main__":
    main()
