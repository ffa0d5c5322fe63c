"""Scheduler of one TP rank: admission, batching, prefix cache, page table."""
