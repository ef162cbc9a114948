"""Value objects (captures, peers, alerts) and the error hierarchy that every stage shares.
Imports nothing from analyzer: it is the bottom of the tree.
"""
