"""`unclip demo`: the whole pipeline on the embedded shapes data, end to end.

- `run`: the orchestration, each stage a separate `unclip` job (what a cluster user runs);
- `judge`: the independent checker of generated images (uses none of the trained models);
- `report`: held-out prompts sampled and judged, `samples.png` and `report.json`.
"""
