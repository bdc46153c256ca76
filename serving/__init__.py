"""Serving: the OpenAI-compatible student server, its engines and the shadow log of every answer."""
