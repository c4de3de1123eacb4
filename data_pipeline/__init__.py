"""Streaming data for unCLIP: shards, the loader, CLIP precompute, embedding readers.

Entry points (plain functions; `launch/` wires them to the CLI):

- `data_pipeline.shards.write_shards(source, out_url, *, per_shard, count, size, seed,
  image_format, quality, min_size, progress) -> ShardReport` — `unclip shards`.
- `data_pipeline.precompute.run_precompute(cfg: PrecomputeConfig, *, shards, out, rank,
  world_size, device, clip, progress) -> PrecomputeSummary` — `unclip precompute`.
- `data_pipeline.stream.build_loader(cfg: DataConfig, *, batch_size, rank, world_size, want,
  tokenizer, state, drop_last) -> StreamLoader` — what a training stage iterates;
  `loader.state_dict()` / `load_state_dict()` resume exactly, `loader.skipped` counts skips.
- `data_pipeline.shapes` — the embedded demo dataset and its ground truth.

One batch's path: io.py (open URL) -> tario.py/tarstream.py (safe tar members) ->
sources.py (which units, join with embeddings) -> stream.py (split, mix, shuffle) ->
decode.py (bytes -> arrays, Skip on bad data) -> sources.collate -> the trainer.
"""
