"""Stage 2, traffic to verdicts: the Azure catalogue, service tags, the policy, classification
and the analysis front door. May import analyzer.base and analyzer.capture.
"""
