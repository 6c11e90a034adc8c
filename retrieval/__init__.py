"""The retrieval layer both methods stand on: memory stores, kNN backends, neighbour precompute.

Will hold the sharded memory store, the exact / FAISS / ScaNN / on-device backends behind one
interface, and the tf.data pipelines that feed precomputed neighbours to the trainers.
"""
