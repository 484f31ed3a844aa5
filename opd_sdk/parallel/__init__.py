"""Parallel: how one step runs over several processes (data parallel, FSDP2, DeepSpeed ZeRO-1/2).

Owns the launch (what `accelerate launch` / `torchrun` asked for, and the checks on it),
`Distributed` (rank 0's collector serving every rank: gather, broadcast, lockstep), the
sharding helpers (`fsdp`, `zero`) and the strategies the loop calls for backward, gradient
sync, clipping, the optimizer step and their own checkpoint state.
May import: the shared vocabulary (errors, constants, types) and torch; nothing of the loop.
"""
