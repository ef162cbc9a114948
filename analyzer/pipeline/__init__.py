"""Runs the stages over blobs: process one capture, reconcile the container, deliver alerts,
report status. May import every stage below: base, capture, judge, present, store.
"""
