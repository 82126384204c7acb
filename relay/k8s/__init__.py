"""Kubernetes API relay: the I/O-free pieces (classification, rules, channel codec, Secret redaction, TLS)."""
