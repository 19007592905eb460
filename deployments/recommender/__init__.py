"""The read path inside the ingress: the pipeline runner, its stage adapters and the fallbacks."""
