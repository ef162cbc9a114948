"""Results as people read them: escaping for every output, and the table, JSON and CSV
renderings. May import analyzer.base only.
"""
