"""Batch embedding: images -> Parquet (path, embedding, error), in this process or on Ray Data.

    python -m embed --artifacts DIR --images SRC --out DST [--ray [ADDRESS]]

`embed_images` (job.py) is the API the command runs; store.py is the output layout (resumable,
atomic parts), worker.py the model each process or actor holds. pyarrow and ray (the `embed` extra)
are imported only when a job runs.
"""

from embed.job import EmbedResult, embed_images
from embed.store import read_embeddings

__all__ = ["EmbedResult", "embed_images", "read_embeddings"]
