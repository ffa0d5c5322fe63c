"""Engine of one TP rank: model forward, KV pool, sampling, CUDA graphs."""
