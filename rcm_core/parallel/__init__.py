"""The machinery that spreads one iteration over GPUs: the device mesh (`mesh`), FSDP2 and replicated data
parallelism (`sharding`), Ulysses context parallelism (`context`), fp32 master weights (`precision`) and
distributed checkpoints (`dcp`). Applied from outside the network: the network never shards itself.

May import: `rcm_core.config`, `kernels`. Never imports the method, the networks, evaluation or the run layer.
"""
