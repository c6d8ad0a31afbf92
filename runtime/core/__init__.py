"""Engine core: requests in, deltas out.

engine (the public Engine and its streams), scheduler (which sequences run each step),
kv_cache (paged blocks and prefix hashes), batch (one step's ForwardBatch), sampling,
speculative (n-gram drafts), metrics, compute (the one compute thread).
"""
