"""Training throughput benchmark; same as `lipschitz bench throughput`. See
lipschitz/bench_throughput.py."""

from lipschitz.bench_throughput import main

if __name__ == "__main__":
    main()
