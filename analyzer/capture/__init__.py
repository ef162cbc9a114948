"""Stage 1, capture bytes to traffic: read the file, decode frames, fold flows into peers,
collect name claims, all within the work budget. May import analyzer.base only.
"""
