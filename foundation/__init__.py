"""The bottom layer of shadow-distill: what every other package may import, and which imports none of them.

- `foundation.errors`: the one exception hierarchy (`ShadowDistillError` and its subclasses);
- `foundation.config`: `StrictConfig`, the one base of every configuration object, and its error translation;
- `foundation.flags`: command-line flags generated from a config's fields;
- `foundation.version`: the installed package version.

The layer order (foundation < schemas < platform < parts < dags < application shell) is written once, in
`tests/unit/test_layers.py`, and described in `docs/design.md`.
"""
