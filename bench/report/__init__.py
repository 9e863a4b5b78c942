"""Every rbee benchmark side by side in one run on this machine, written to docs/benchmarks.md.

    python -m bench.report                      # all parts (~10 min on 2 busy cores)
    python -m bench.report --only status,sftp   # some parts; markdown on stdout, plots in a temp dir
    python -m bench.report --only relay --quick --out /tmp/relay.md

Parts (each a function `part_<name>` in its own module, returning a `Section`):

- `worker`   worker SSE vs the runtime driven in process (bench/worker_overhead.py), tiny model and SmolLM2;
- `llama`    rbee worker vs `python -m llama_cpp.server` on SmolLM2, 1/4/8 concurrent clients
             (bench/worker_overhead.py, mode llama-server);
- `relay`    queen relay vs the worker directly, single streams and 1/4/16 concurrent (bench/relay.py);
- `infer`    `rbee-keeper infer` cold (fresh node home: no hive, model not on the node) vs warm (worker
             known and up), by phase, on a real sshd node and on the local node, and the warm path
             against calling the worker directly;
- `status`   `rbee-keeper status` over 1/2/4/8 sshd nodes (127.0.0.2…127.0.0.9, each its own sshd and home);
- `sftp`     the SSH transport's SFTP `put` vs `scp` (and `scp -O`) of a 256 MiB file to the same sshd;
- `download` `rbee-hive models add http://127.0.0.1:P/…` vs `curl` of the same ~100 MB GGUF from the same
             local server (tests/hive/servers.py).

Every measurement is paired with its baseline and interleaved (the order flips or rotates every
repetition), so drift and other load on the shared machine hit both sides alike; the report gives
medians and the per-repetition figures behind them. Every loop is bounded in count, every
subprocess and request in time. Servers listen on 127.0.0.0/8 only. Everything started here
(sshd nodes, hives, workers, servers) is stopped on exit, errors and SIGTERM included; hives and
workers are found by their (unique, temporary) home path and killed by pid if `hive stop` left any.
"""
