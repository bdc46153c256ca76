"""shadow-distill: the CLI, the demo and the local stack that tie the parts together.

`shadow_distill.errors` is the one exception hierarchy every part raises from.
"""
