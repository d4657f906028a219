"""``make bench``: the throughput, latency and memory figures, and the processes that produce them."""
