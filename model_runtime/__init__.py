"""The shared model runtime: loading models offline, aligned per-token logprobs, sampling, LoRA adapters.

Serving, the teacher scorer, the trainer and the evaluators all import this package; none of them imports
another part. See `logprobs.py` for the position alignment every logprob in the project goes through.
"""
