"""The `nwcap` command: options, exit codes and output; each command hands off to a stage
below. May import all of analyzer; nothing in analyzer imports it.
"""
