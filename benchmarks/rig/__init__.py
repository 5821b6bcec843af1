"""The parts of bench_proxy.py that are not about what it measures.

- `client`: the benchmark's own keep-alive HTTP/1.1 client (1 in flight and N connections);
- `openloop`: the fixed-rate (open-loop) generator behind the rate sweep;
- `procs`: starting, watching and stopping the processes under test, and what they cost
  (CPU time and memory, read from /proc);
- `nginx`: the native upstream, Debian's nginx serving canned answers.

They live here so that bench_proxy.py reads as the benchmark itself: plan, phases, report.
"""
