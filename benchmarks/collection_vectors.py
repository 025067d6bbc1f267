"""Dump an indexed collection's global vectors to a .npy, for `benchmarks/query.py --corpus-npy`
(search latency and ANN recall measured on real embeddings, e.g. Iconify's icons):

    .venv/bin/python -m xmodal.cli --data-dir D data fetch iconify --sets all
    .venv/bin/python -m xmodal.cli index --manifest D/iconify/manifest.jsonl --split all --local \\
        --workers 2 --embed-threads 1 --milvus-uri /tmp/iconify.db
    .venv/bin/python benchmarks/collection_vectors.py /tmp/iconify.db xmodal_images /tmp/iconify.npy
    .venv/bin/python benchmarks/query.py --sizes 100000 --corpus-npy /tmp/iconify.npy
"""
from __future__ import annotations

import argparse
import sys

import numpy as np
from tqdm import tqdm


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("milvus_uri")
    parser.add_argument("collection")
    parser.add_argument("out")
    args = parser.parse_args()
    from xmodal import contract, store

    client = store.connect(args.milvus_uri)
    try:
        store.ensure_loaded(client, args.collection)
        rows = client.get_collection_stats(args.collection)["row_count"]
        vectors = []
        iterator = client.query_iterator(args.collection, batch_size=5000, filter='id != ""', output_fields=[contract.vector_field(contract.GLOBAL)])
        with tqdm(total=rows, unit="row", file=sys.stderr) as bar:
            while batch := iterator.next():
                vectors.append(np.asarray([row[contract.vector_field(contract.GLOBAL)] for row in batch], dtype=np.float32))
                bar.update(len(batch))
        iterator.close()
    finally:
        client.close()
        store.release_local(args.milvus_uri)
    x = np.concatenate(vectors)
    np.save(args.out, x)
    print(f"{args.out}: {x.shape[0]} vectors of {x.shape[1]}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
