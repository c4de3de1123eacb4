"""Other systems' formats as pure maps of configs and state dicts (no file I/O; reading and
writing folders is `launch/`'s job): diffusers' unCLIP layout (Karlo's released weights) in
`diffusers_unclip`, Hugging Face's CLIP text encoder in `hf_clip_text`."""
