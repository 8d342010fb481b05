"""``lmport bench``: a serving load generator following vLLM's ``bench serve`` protocol.

Prompts are random token ids of a fixed length, sent to an OpenAI ``/v1/completions``
endpoint with a fixed ``max_tokens``, ``ignore_eos`` and streaming; requests arrive by a
Poisson process (or all at once) under a concurrency cap. Reported: request and token
throughput, TTFT, TPOT, ITL and end-to-end latency (mean, median, percentiles).

- :mod:`lmport.bench.dataset`: the seeded random prompts
- :mod:`lmport.bench.client`: one streamed request and its timings
- :mod:`lmport.bench.metrics`: the arithmetic from timings to the reported numbers
- :mod:`lmport.bench.runner`: arrivals, the concurrency cap, the progress bar, sweeps
- :mod:`lmport.bench.report`: the table and the JSON
- :mod:`lmport.bench.checkpoint`: random-weight checkpoints of real shapes, with a tokenizer
"""
