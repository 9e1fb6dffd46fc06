"""payflow's benchmarks (`make bench`): each prints a table and writes JSON to bench/results/."""
