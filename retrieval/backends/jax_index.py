"""`JaxIndex`: on-device exact (`lax.top_k`) or approximate (`lax.approx_max_k`) search over a
memory sharded across this process's devices."""

from __future__ import annotations

import os
from typing import Any, Callable

import numpy as np

from retrieval.backends.base import Index, check_float_param


class JaxIndex(Index):
    """On-device search: memory rows sharded over a 1-D ``("memory",)`` mesh of this process's devices
    (each process of a job holds its own copy and searches its own queries, no collective across
    processes).

    Each device scores its shard and takes a local top-k (``lax.top_k`` when exact,
    ``lax.approx_max_k`` with ``recall_target`` when approximate); the q x (k * devices)
    candidates are gathered and reduced with ``lax.top_k`` again. Rows are padded to a multiple
    of the device count; padded rows score -inf and never win (k <= n). Queries go through the
    jitted search in fixed blocks of ``query_block`` rows, so only one shape compiles per k.
    ``add`` rebuilds the device array from the host copy.

    Search-time parameter (``set_search_params``, approximate only): recall_target.
    """

    def __init__(self, approximate: bool = False, recall_target: float = 0.95,
                 query_block: int = 256) -> None:
        super().__init__()
        self.approximate = bool(approximate)
        self.name = "jax_approx" if self.approximate else "jax_exact"
        self.recall_target = float(recall_target)
        self.query_block = int(query_block)
        self._emb: np.ndarray | None = None
        self._fns: dict[int, Callable] = {}

    def _config(self) -> dict:
        import jax

        return {"devices": jax.local_device_count(),
                "params": {"approximate": self.approximate, "recall_target": self.recall_target,
                           "query_block": self.query_block}}

    def _search_param_names(self) -> tuple[str, ...]:
        return ("recall_target",) if self.approximate else ()

    def _check_search_param(self, name: str, value: Any) -> Any:
        return check_float_param(name, value, 0.0, 1.0, low_open=True)

    def _apply_search_params(self) -> None:
        self._fns = {}  # the jitted searches close over recall_target: trace them again

    def _build(self, emb, ids):
        self._emb = emb.copy()
        self._place()

    def _place(self) -> None:
        import jax
        from jax.sharding import NamedSharding, PartitionSpec as P

        ndev = jax.local_device_count()
        n, d = self._emb.shape
        n_pad = -(-n // ndev) * ndev
        mem = np.zeros((n_pad, d), np.float32)
        mem[:n] = self._emb
        self._mesh = jax.make_mesh((ndev,), ("memory",), axis_types=(jax.sharding.AxisType.Explicit,),
                                   devices=jax.local_devices())
        self._mem = jax.device_put(mem, NamedSharding(self._mesh, P("memory", None)))
        self._n_valid = n
        self._rows_per_shard = n_pad // ndev
        self._fns = {}

    def _search_fn(self, k: int) -> Callable:
        if k in self._fns:
            return self._fns[k]
        import jax
        import jax.numpy as jnp
        from jax.sharding import PartitionSpec as P

        rows = self._rows_per_shard
        n_valid = self._n_valid
        k_local = min(k, rows)
        approx, recall = self.approximate, self.recall_target

        def local(mem_shard, q):
            scores = jnp.dot(q, mem_shard.T, precision=jax.lax.Precision.HIGHEST)
            offset = jax.lax.axis_index("memory") * rows
            row = offset + jnp.arange(rows)
            scores = jnp.where((row < n_valid)[None, :], scores, -jnp.inf)
            if approx:
                s, i = jax.lax.approx_max_k(scores, k_local, recall_target=recall)
            else:
                s, i = jax.lax.top_k(scores, k_local)
            return s, (i + offset).astype(jnp.int32)

        replicated = jax.sharding.NamedSharding(self._mesh, P())
        sharded = jax.shard_map(local, mesh=self._mesh,
                                in_specs=(P("memory", None), P()),
                                out_specs=(P(None, "memory"), P(None, "memory")))

        @jax.jit
        def search(mem, q):
            s, i = sharded(mem, q)
            s = jax.sharding.reshard(s, replicated)  # gather the q x (k * devices) candidates
            i = jax.sharding.reshard(i, replicated)
            top_s, pos = jax.lax.top_k(s, k)
            return top_s, jnp.take_along_axis(i, pos, axis=1)

        self._fns[k] = search
        return search

    def _add(self, emb, ids):
        self._emb = np.concatenate([self._emb, emb])
        self._place()

    def _search(self, q, k):
        import jax
        from jax.sharding import NamedSharding, PartitionSpec as P

        fn = self._search_fn(k)
        nq, d = q.shape
        bs = self.query_block
        out_s = np.empty((nq, k), np.float32)
        out_r = np.empty((nq, k), np.int64)
        rep = NamedSharding(self._mesh, P())
        for st in range(0, nq, bs):
            blk = q[st:st + bs]
            m = blk.shape[0]
            if m < bs:
                blk = np.concatenate([blk, np.zeros((bs - m, d), np.float32)])
            s, r = fn(self._mem, jax.device_put(blk, rep))
            out_s[st:st + m] = np.asarray(s)[:m]
            out_r[st:st + m] = np.asarray(r)[:m]
        return out_s, self._ids[out_r]

    def _save(self, directory):
        np.save(os.path.join(directory, "embeddings.npy"), self._emb)
        np.save(os.path.join(directory, "ids.npy"), self._ids)

    def _load(self, directory, meta):
        self._emb = np.load(os.path.join(directory, "embeddings.npy"))
        self._place()
