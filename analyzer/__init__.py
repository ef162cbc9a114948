"""nwcap: per-peer summaries and alerts for Azure Network Watcher packet captures."""

__version__ = "0.1.0"
