"""Azure Storage at the edge: blob paths and streams, connections, Table keys, entities and
the results store. May import analyzer.base only: it keeps what the stages produced.
"""
