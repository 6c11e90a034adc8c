"""The retrieval layer both methods stand on.

  memory_store.py      sharded, memory-mapped image/text embeddings with a manifest
  encode_memory.py     TFDS pairs -> frozen encoder -> memory store (resumable job and CLI)
  backends/            exact / FAISS / ScaNN / on-device JAX kNN behind one Index interface,
                       one module per backend; `set_search_params` for search-time settings
  topk.py              the one top-k and top-k merge (descending score, ties by lower id)
  search.py            search modes (query x searched x payload modality), exclusion
  distributed.py       a memory split over shards or processes, per-piece top-k merged
  precompute.py        every example's neighbours written as TFRecord shards (resumable)
  neighbour_reader.py  the tf.data reader of those shards
"""
