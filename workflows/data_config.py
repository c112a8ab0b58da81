"""Ray Train's DataConfig for the run's dataset, in a module of its own: Ray Train unpickles it in its
DatasetManager actor, which then imports this module, not `workflows.trainer` with torch and rcm_core (5.2 s of
that actor's start-up, about one core-second in four of a tiny run's worker-group start on the 2-core box)."""
from __future__ import annotations

import ray.train


class GroupReaderDataConfig(ray.train.DataConfig):
    """Ray Train's default splits the data set into one stream per worker; with context parallelism the cp
    ranks of a group train on the same samples, so split it into one stream per group and hand it to the
    group's first rank (rank = group·cp + c, rcm_core.parallel.mesh), which sends each batch to the others
    (rcm_core.parallel.sharding.share_batch). The other ranks hold the same iterator but never pull from it."""

    def __init__(self, cp: int = 1):
        super().__init__()
        self.cp = cp

    def _resolve_execution_options(self, name: str):
        # Ray Train replaces the dataset's execution options with ones built from the *global* DataContext,
        # which drops the preserve_order that workflows.data sets; without it two runs with the same seed get
        # their batches in different orders (measured: train/loss 91.85 vs 93.90 at step 1), and a resumed
        # worker could not replay the stream to its checkpoint's position.
        options = super()._resolve_execution_options(name)
        options.preserve_order = True
        return options

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        if self.cp == 1:
            return super().configure(datasets, world_size, worker_handles, worker_node_ids, **kwargs)
        groups = world_size // self.cp
        out = [{} for _ in range(world_size)]
        for name, ds in datasets.items():
            ds = ds.copy(ds)
            ds.context.execution_options = self._resolve_execution_options(name)
            leaders = worker_node_ids[::self.cp] if (worker_node_ids and self._enable_shard_locality) else None
            for g, split in enumerate(ds.streaming_split(groups, equal=True, locality_hints=leaders)):
                for c in range(self.cp):
                    out[g * self.cp + c][name] = split
        return out
